"""Image bytes -> RGB -> the crop each stage trains or evaluates on.

Every mode but fine-tuning yields uint8 (3, S, S) tensors (normalised later, on the device, by
`normalizer`); fine-tuning yields timm's normalised, randomly erased float tensors.

  pretrain  RandomResizedCrop(S, scale crop_scale (0.2-1), ratio 3/4-4/3, bicubic) + horizontal flip
  probe     MAE's linear-probe transform: RandomResizedCrop(S, scale 0.08-1, bicubic) + flip
  eval      resize the short side to floor(S / crop_pct) (bicubic), centre crop S (crop_pct 0.875: 256 -> 224)
  finetune  timm.data.create_transform(is_training=True): RandomResizedCrop, flip, RandAugment
            rand-m9-mstd0.5-inc1, normalise, random erasing 0.25 (pixel mode), bicubic: MAE's recipe

The crop box (and the flip) is drawn from the image's header size before any pixel is decoded. A
JPEG whose crop region is at least 2x (4x, 8x) the target in both directions is decoded at 1/2 (1/4,
1/8) size by libjpeg's DCT scaling (PIL `draft`), and the box scaled to match. Of other JPEGs only
the crop region is decoded, mirrored if flipped, by mpp's libjpeg-turbo extension (`_jpegcrop.c`;
the same pixels as a full decode; 0.36-0.45 ms an imagewoof320 photo against 0.43-0.50); where that extension
was not built, or refuses a file, torchvision's libjpeg-turbo decoder decodes the whole image
straight into a tensor. Other formats go through PIL. The resize is one antialiased bicubic
`interpolate` of the crop region (torchvision's tensor RandomResizedCrop does the same), several
times faster than PIL's bicubic resize.

Greyscale, palette, CMYK, 16-bit and other modes become RGB; alpha is composited on white (what
a viewer shows; the colour under fully transparent pixels is often arbitrary). EXIF orientation is
not applied (neither PIL's open nor torchvision's decoder does; data_tools writes photos upright).
"""
from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mpp.jpeg import jpeg_size

try:  # libjpeg-turbo straight into a tensor; deprecated in torchvision 0.29 (for TorchCodec), PIL stands in without it
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
    # The operator behind decode_jpeg, called directly where it exists: the wrapper's per-call deprecation
    # warning and checks cost ~40 us an image, a tenth of the decode (imagewoof320, this project's CPU).
    _tv_decode_op = getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)
except ImportError:  # pragma: no cover
    _tv_decode_jpeg = _tv_decode_op = None


def _decode_jpeg_tensor(data: bytes) -> torch.Tensor:
    """torchvision's JPEG decoder -> uint8 (3, H, W) RGB (raises RuntimeError on data it cannot decode)."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if _tv_decode_op is not None:
        return _tv_decode_op(encoded, ImageReadMode.RGB.value, False)  # False: no EXIF rotation, as PIL's open
    with warnings.catch_warnings():  # its deprecation notice, once per image otherwise under pytest
        warnings.simplefilter("ignore", DeprecationWarning)
        return _tv_decode_jpeg(encoded, mode=ImageReadMode.RGB)


try:  # region-only JPEG decoding (mpp/data/_jpegcrop.c), an optional extension: built where libjpeg-turbo's headers are
    from mpp.data._jpegcrop import decode_crop as _decode_crop
except ImportError:  # pragma: no cover - whole JPEGs are decoded instead
    _decode_crop = None

_warned_no_region_decoder = False


def warn_if_no_region_decoder(log) -> None:
    """Say once per process that JPEG crops are decoded whole, and how to get the faster path."""
    global _warned_no_region_decoder
    if _decode_crop is None and not _warned_no_region_decoder:
        _warned_no_region_decoder = True
        log.warning("mpp's region JPEG decoder (mpp/data/_jpegcrop.c) is not built, so JPEGs are decoded whole "
                    "(~0.1 ms an image slower at 320 px): install libjpeg-turbo's headers (e.g. apt install "
                    "libjpeg-turbo8-dev) and a C compiler, then run pip install -e . again")


# The operator behind F.interpolate(mode="bicubic", antialias=True). Its out= form writes a crop straight
# into its slot of the batch, saving a copy: with the flip done before the resize, crop + flip + resize
# take 179 us an image against 193 us (imagewoof320 crops at 224 px, this project's CPU; the resize alone
# is 165 us). tests/test_data_loader.py checks that both paths equal torchvision's resized_crop + flip.
_resize_into = getattr(getattr(torch._C, "_nn", None), "_upsample_bicubic2d_aa", None)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")


def image_bytes(sample: dict) -> bytes | None:
    """The encoded image of a WebDataset sample, whichever extension it is stored under."""
    return next((sample[ext] for ext in IMAGE_EXTS if sample.get(ext) is not None), None)


MODES = ("pretrain", "probe", "eval", "finetune")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (loads the image)."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale -> 8-bit
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
            a = a / 257.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV


def decode_rgb(data: bytes) -> Image.Image:
    """Image bytes -> RGB PIL image."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = to_rgb(img)
        return rgb if rgb is not img else img.copy()


def pil_to_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) tensor (a channels-last view)."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def decode_chw(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W) RGB tensor: JPEGs through torchvision's decoder, others through PIL."""
    if _tv_decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            return _decode_jpeg_tensor(data)
        except RuntimeError:
            pass  # PIL decides whether it is corrupt, and raises if it is
    return pil_to_chw(decode_rgb(data))


def draft_factor(region_w: float, region_h: float, out_w: int, out_h: int) -> int:
    """The largest JPEG reduction (8, 4, 2) that leaves the crop region at least the output size, else 1."""
    for factor in (8, 4, 2):
        if region_w >= factor * out_w and region_h >= factor * out_h:
            return factor
    return 1


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: random.Random):
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`: (top, left, h, w).

    Restated because torchvision's draws from the global torch RNG and takes no generator: the
    loader's crops must come from each sample's own seeded RNG, so the stream replays exactly and
    the trainer's RNG (masking, init) is never moved by data loading. It also needs only the
    header's size, so the crop is known before the JPEG is decoded (and can be decoded reduced).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(width: int, height: int, size: int, crop_pct: float):
    """The region that Resize(floor(size / crop_pct)) + CenterCrop(size) shows, in source pixels: (top, left, h, w)."""
    scale_size = math.floor(size / crop_pct)
    side = size * min(width, height) / scale_size
    h, w = min(height, side), min(width, side)
    return (height - h) / 2, (width - w) / 2, h, w


class CropTransform:
    """bytes -> uint8 (3, size, size): a random-resized or centre crop, optional flip, JPEG draft or region decoding.

    The result is channels-last in memory (the layout the resize is fastest in); with `out` (a
    (3, size, size) view, e.g. a slot of a channels-last batch) it is written there.
    """

    dtype, channels_last = torch.uint8, True  # what it yields

    def __init__(self, size: int, kind: str = "random", scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                 crop_pct: float = 0.875, draft: bool = True):
        if kind not in ("random", "center"):
            raise ValueError(f"crop kind must be 'random' or 'center', got {kind!r}")
        self.size, self.kind, self.scale, self.ratio = size, kind, tuple(scale), tuple(ratio)
        self.flip, self.crop_pct, self.draft = flip, crop_pct, draft
        self.drafted = 0  # decodes at reduced size (in this process)
        self.region_decoded = 0  # JPEGs of which only the crop region was decoded (in this process)
        self._region = None  # the buffer those decodes write to, grown as needed

    def box(self, width: int, height: int, rng: random.Random):
        if self.kind == "random":
            return random_resized_crop_box(width, height, self.scale, self.ratio, rng)
        return center_crop_box(width, height, self.size, self.crop_pct)

    def _pixels(self, data: bytes, rng: random.Random, size, box):
        """Decoded pixels (3, H, W) and the crop box in their coordinates; `box` was drawn from the JPEG
        header's `size` (both None for other formats: drawn here, from PIL's header)."""
        if size is not None:
            top, left, h, w = box
            factor = draft_factor(w, h, self.size, self.size) if self.draft else 1
            if factor == 1 and _tv_decode_jpeg is not None:
                try:
                    return _decode_jpeg_tensor(data), box
                except RuntimeError:
                    pass  # PIL decides below whether it is corrupt, and raises if it is
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if size != (width, height):
                box = self.box(width, height, rng)
            top, left, h, w = box
            factor = draft_factor(w, h, self.size, self.size) if self.draft and img.format == "JPEG" else 1
            if factor > 1:
                drafted = img.draft("RGB", (width // factor, height // factor))
                reduction = width / drafted[1][2] if drafted else 1.0
                top, left, h, w = top / reduction, left / reduction, h / reduction, w / reduction
                self.drafted += reduction > 1
            return pil_to_chw(to_rgb(img)), (top, left, h, w)

    def __call__(self, data: bytes, rng: random.Random | None, out: torch.Tensor | None = None) -> torch.Tensor:
        size = jpeg_size(data)
        if size is None:  # not a JPEG: the box comes from PIL's header
            pixels, box = self._pixels(data, rng, None, None)
            return self.crop(pixels, box, self.flip and rng.random() < 0.5, out)
        box = self.box(*size, rng)
        flip = self.flip and rng.random() < 0.5
        # Only a JPEG that ends with its end-of-image marker: the region decode stops after the region's last
        # row, so a truncated file (the common corruption) must go to the whole-image decoders, which reject it.
        if (_decode_crop is not None and data[-2:] == b"\xff\xd9"
                and (not self.draft or draft_factor(box[3], box[2], self.size, self.size) == 1)):
            region = self._decode_region(data, crop_bounds(box, size[1], size[0]), flip)
            if region is not None:
                return self._resize(region, out)
        pixels, box = self._pixels(data, rng, size, box)
        return self.crop(pixels, box, flip, out)

    def _decode_region(self, data: bytes, bounds, flip: bool) -> torch.Tensor | None:
        """Only the rows y0:y1 and columns x0:x1 of a JPEG, flipped if asked: a channels-last (1, 3, h, w) view
        of this transform's buffer, valid until its next call; None if libjpeg refuses the file (corrupt data
        above or in the region, CMYK). Data corrupt only below the region goes unnoticed: the region's pixels
        are intact, and finding it would cost 0.04 ms an image (entropy-decoding the rest)."""
        y0, y1, x0, x1 = bounds
        h, w = y1 - y0, x1 - x0
        if self._region is None or self._region.numel() < h * w * 3:
            self._region = torch.empty(h * w * 3, dtype=torch.uint8)
        try:
            _decode_crop(data, y0, x0, h, w, flip, self._region.numpy())
        except RuntimeError:
            return None  # the whole-image decoders below decide whether it is corrupt
        self.region_decoded += 1
        return self._region[:h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2)

    def __getstate__(self):  # a transform sent to loader workers leaves its buffer behind
        return {**self.__dict__, "_region": None}

    def crop(self, pixels: torch.Tensor, box, flip: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded uint8 (3, H, W) pixels -> the (top, left, h, w) box resized to (3, size, size), flipped if asked."""
        y0, y1, x0, x1 = crop_bounds(box, pixels.shape[1], pixels.shape[2])
        region = pixels[:, y0:y1, x0:x1].unsqueeze(0)
        # Flipping the region before the resize gives the same pixels as flipping the result (the filter is
        # symmetric; the test against torchvision checks it), and the flip is then the one copy the resize
        # needs anyway to read a channels-last region.
        if flip:
            region = region.flip(-1)
        return self._resize(region.contiguous(memory_format=torch.channels_last), out)

    def _resize(self, region: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """A channels-last uint8 (1, 3, h, w) region -> (3, size, size), written into `out` if given."""
        if out is not None and _resize_into is not None:
            _resize_into(region, (self.size, self.size), False, None, None, out=out.unsqueeze(0))
            return out
        resized = F.interpolate(region, size=(self.size, self.size), mode="bicubic", antialias=True,
                                align_corners=False)[0]
        if out is None:
            return resized
        out.copy_(resized)
        return out


def crop_bounds(box, height: int, width: int) -> tuple[int, int, int, int]:
    """A (top, left, h, w) box, possibly fractional -> the pixel rows y0:y1 and columns x0:x1 it reads
    (at least one of each, inside a height x width image)."""
    top, left, h, w = box
    y0, x0 = min(int(round(top)), height - 1), min(int(round(left)), width - 1)
    y1, x1 = min(max(int(round(top + h)), y0 + 1), height), min(max(int(round(left + w)), x0 + 1), width)
    return y0, y1, x0, x1


def posterize_keeping(img, bits_to_keep, **_):
    """timm's posterize, where keeping 0 bits gives black, as Pillow did before it refused bits=0."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def keep_zero_bit_posterize(transform) -> None:
    """RandAugment's increasing posterize keeps 4 - int(4 * magnitude / 10) bits: 0 at magnitude 10, which the
    spec's `mstd` noise reaches, and which Pillow now refuses (the sample would be dropped as unreadable)."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name == "PosterizeIncreasing":
                op.aug_fn = posterize_keeping


class TimmTransform:
    """bytes -> float normalised (3, size, size) via timm's create_transform (fine-tuning).

    timm's augmentations draw from the global `random`, `numpy.random` and torch RNGs; the dataset
    seeds those for each sample from (seed, epoch, key) (and puts the caller's states back in the main process).
    """

    uses_global_rng = True
    dtype, channels_last = torch.float32, False

    def __init__(self, size: int, mean, std, training: bool = True, crop_pct: float = 0.875,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25):
        from timm.data import create_transform
        if training:  # MAE's fine-tuning augmentation by default
            self.transform = create_transform(
                input_size=size, is_training=True, color_jitter=None, auto_augment=auto_augment,
                interpolation="bicubic", re_prob=re_prob, re_mode="pixel", re_count=1, mean=tuple(mean), std=tuple(std))
            keep_zero_bit_posterize(self.transform)
        else:
            self.transform = create_transform(input_size=size, is_training=False, interpolation="bicubic",
                                              crop_pct=crop_pct, mean=tuple(mean), std=tuple(std))
        self.size = size

    def __call__(self, data: bytes, rng: random.Random | None, out: torch.Tensor | None = None) -> torch.Tensor:
        image = self.transform(decode_rgb(data))
        if out is None:
            return image
        out.copy_(image)
        return out


def build_transform(mode: str, img_size: int, crop_scale=None, mean=None, std=None, crop_pct: float = 0.875,
                    draft: bool = True, augment: dict | None = None):
    """The per-sample transform of a loader mode (see the module docstring); `augment`: TimmTransform's
    options (auto_augment, re_prob) in finetune mode."""
    if mode == "pretrain":
        return CropTransform(img_size, "random", scale=tuple(crop_scale or (0.2, 1.0)), draft=draft)
    if mode == "probe":
        return CropTransform(img_size, "random", scale=tuple(crop_scale or (0.08, 1.0)), draft=draft)
    if mode == "eval":
        return CropTransform(img_size, "center", flip=False, crop_pct=crop_pct, draft=draft)
    if mode == "finetune":
        from mpp.config import IMAGENET_MEAN, IMAGENET_STD
        return TimmTransform(img_size, mean or IMAGENET_MEAN, std or IMAGENET_STD, training=True, **(augment or {}))
    raise ValueError(f"loader mode must be one of {', '.join(MODES)}; got {mode!r}")
