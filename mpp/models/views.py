"""A second random view of every image of a batch, made on the device from the loader's crop.

The contrastive term of `MAE` compares two views of each image. Making the second one from the batch
the loader already decoded costs no second decode, works with any loader, and keeps the data pipeline
single-view. Its augmentations are SimCLR's (Chen et al., 2020), which found that crops need colour
distortion beside them: two crops of one image share its colour histogram, which a network can match
without seeing anything else.
- a random resized crop of the batch image (a crop of the loader's crop), bilinear, by roi_align;
- a horizontal flip with probability 1/2;
- colour distortion (`color_distort`): contrast, saturation, brightness and a colour cast, then grey.

Why not torchvision's transforms: they draw one set of random parameters per call, so a view per
image means a Python call per image. For 128 CIFAR-size images (crop, flip, jitter without hue, grey)
that took 33 ms on the 2-core development CPU against 5-7 ms here, about 3% of a training step against
under 1% (`python -m mpp.bench views`); on a GPU the per-image calls would be launches of tiny kernels.

Colours are changed in the normalised space the model sees (per-channel affine of the pixels), where
contrast about the image's mean is exact and brightness, saturation and grey are close to their pixel
versions; the target of a view is that view, so nothing needs to be undone.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align


def crop_boxes(batch: int, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
               device=None, generator=None) -> torch.Tensor:
    """RandomResizedCrop's boxes as roi_align wants them, (B, 5): index, x1, y1, x2, y2 in pixels.

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; a box that would not fit is
    shrunk to fit (torchvision retries instead; here every sample needs one box, in one batched draw)."""
    h, w = size
    u = torch.rand(batch, 4, device=device, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    bw = torch.sqrt(area * aspect).clamp(max=w)
    bh = torch.sqrt(area / aspect).clamp(max=h)
    x1 = (w - bw) * u[:, 2]
    y1 = (h - bh) * u[:, 3]
    index = torch.arange(batch, device=device, dtype=torch.float32)
    return torch.stack([index, x1, y1, x1 + bw, y1 + bh], dim=1)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each box of `crop_boxes` cut from its image and resized to the image's size, bilinear: roi_align
    with aligned=True and one sample per output pixel (a full box returns the image)."""
    return roi_align(x, boxes, tuple(x.shape[-2:]), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def color_distort(x: torch.Tensor, strength: float, color_p: float, gray_p: float, generator=None) -> torch.Tensor:
    """SimCLR-style colour distortion of a normalised float batch (B, C, H, W), each sample its own.

    With probability `color_p`: contrast and saturation factors uniform in [1 - strength, 1 + strength],
    a brightness shift of all channels uniform in ±2·strength and a colour cast of each channel in
    ±strength/2 (normalised units, about one pixel standard deviation: at 0.4, close to SimCLR's
    brightness 0.4 on a mid-grey image). Then grey, the channels' mean, with probability `gray_p`."""
    b, c = x.shape[:2]
    u = torch.rand(b, 5 + c, device=x.device, generator=generator)
    per_sample = lambda v: v.view(b, 1, 1, 1)  # noqa: E731
    contrast, saturation = (per_sample(1 - strength + 2 * strength * u[:, i]) for i in (0, 1))
    shift = per_sample(2 * strength * (2 * u[:, 2] - 1)) + (strength / 2 * (2 * u[:, 5:] - 1)).view(b, c, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    y = (x - mean) * contrast + mean + shift
    gray = y.mean(dim=1, keepdim=True)
    y = torch.where(per_sample(u[:, 3] < color_p), gray + (y - gray) * saturation, x)
    return torch.where(per_sample(u[:, 4] < gray_p), y.mean(dim=1, keepdim=True).expand_as(y), y)


def random_view(imgs: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                strength: float = 0.4, color_p: float = 0.8, gray_p: float = 0.2, generator=None) -> torch.Tensor:
    """A random crop (resized back to the batch's size), flip and colour distortion of each image."""
    b, _, h, w = imgs.shape
    x = imgs.float()
    x = resized_crops(x, crop_boxes(b, (h, w), scale, ratio, x.device, generator))
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    return color_distort(x, strength, color_p, gray_p, generator).to(imgs.dtype)
