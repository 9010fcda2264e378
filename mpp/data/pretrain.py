"""Beside the loader, what the training jobs take from mpp.data: the on-device normaliser and preview images."""
from __future__ import annotations

import torch

from .decode import CropTransform, image_bytes
from .shards import read_first


def preview_images(url: str, img_size: int, count: int = 8) -> torch.Tensor:
    """The first `count` images of a shard, short side resized to img_size and centre-cropped: a fixed set
    to watch reconstructions improve on."""
    view = CropTransform(img_size, "center", flip=False, crop_pct=1.0)
    encoded = (image_bytes(sample) for sample in read_first(url, count))
    return torch.stack([view(data, None) for data in encoded if data is not None])


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

