"""What the pretraining job takes from mpp.data: batches, the on-device normaliser, preview images.

`pretrain_loader` is the first loader's interface, kept until the trainer drives `ShardLoader`
itself (epochs, `state_dict`, the `bad` counts); it yields the image tensors of a pretrain-mode
`ShardLoader`, epoch after epoch, `num_batches` in all.
"""
from __future__ import annotations

import torch

from .decode import CropTransform
from .loader import ShardLoader
from .shards import read_first

IMAGE_KEYS = "jpg;jpeg;png;webp;bmp;tif;tiff"


class _Images:
    def __init__(self, loader: ShardLoader, num_batches: int):
        self.loader, self.num_batches = loader, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for count, batch in enumerate(self.loader.forever()):
            if count >= self.num_batches:
                return
            yield batch["image"]


def pretrain_loader(data_cfg, img_size: int, micro_batch: int, num_batches: int, seed: int):
    """An iterable of exactly `num_batches` uint8 (B, 3, H, W) batches (the first loader's interface)."""
    loader = ShardLoader.from_config(data_cfg, mode="pretrain", img_size=img_size, batch_size=micro_batch, seed=seed)
    return _Images(loader, num_batches)


def preview_images(url: str, img_size: int, count: int = 8) -> torch.Tensor:
    """The first `count` images of a shard, short side resized to img_size and centre-cropped: a fixed set
    to watch reconstructions improve on."""
    view = CropTransform(img_size, "center", flip=False, crop_pct=1.0)
    samples = read_first(url, count)
    images = []
    for sample in samples:
        data = next((sample[k] for k in IMAGE_KEYS.split(";") if k in sample), None)
        if data is not None:
            images.append(view(data, None))
    return torch.stack(images)


def normalizer(mean, std, device):
    """Batch -> float normalised per channel, on `device` (constants made once).

    uint8 (B, C, H, W) is scaled and normalised; floating input (fine-tuning's timm transform has
    normalised it already) is moved to the device unchanged. The result is contiguous (the loader's
    uint8 batches are channels-last in memory).
    """
    scale = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255

    def normalize(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        if batch.is_floating_point():
            return batch.contiguous()
        return ((batch.float() - shift) / scale).contiguous()

    return normalize

