"""The pretraining stream: resampled shards -> shuffle -> decode -> random crop -> uint8 batches.

Shards are drawn with replacement per rank and worker (webdataset's ResampledShards), so
every rank yields exactly as many batches as asked, whatever the shard count, and no
rank waits on another at the end of an epoch. The stream is seeded by (seed, start step,
rank, worker): a resumed run draws fresh samples instead of replaying its first ones.
Normalisation happens on the device, on the whole batch (`normalizer`), so workers ship uint8.
"""
from __future__ import annotations

import io
import math

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2 as T

from .shards import resolve_shards

IMAGE_KEYS = "jpg;jpeg;png;webp;bmp;tif;tiff"


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")  # greyscale, palette, CMYK and alpha all become RGB


def pretrain_transform(img_size: int, crop_scale) -> T.Compose:
    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
    ])


def pretrain_loader(data_cfg, img_size: int, micro_batch: int, num_batches: int, seed: int) -> wds.WebLoader:
    """An iterable of exactly `num_batches` (rounded up to the worker count) uint8 (B, 3, H, W) batches."""
    urls = resolve_shards(data_cfg.train, data_cfg.split).urls
    workers = data_cfg.num_workers
    transform = pretrain_transform(img_size, data_cfg.crop_scale)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(data_cfg.shuffle_buffer, seed=seed),
        wds.to_tuple(IMAGE_KEYS),
        wds.map(lambda sample: transform(decode_rgb(sample[0])), handler=wds.warn_and_continue),
        wds.batched(micro_batch, collation_fn=torch.stack, partial=False),
    ).with_epoch(math.ceil(num_batches / max(workers, 1)))
    generator = torch.Generator().manual_seed(seed)  # seeds the workers' crop and flip draws
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, generator=generator,
                         pin_memory=torch.cuda.is_available(), persistent_workers=False)


def preview_images(url: str, img_size: int, count: int = 8) -> torch.Tensor:
    """The first `count` images of a shard, centre-cropped: a fixed set to watch reconstructions improve on."""
    view = T.Compose([T.PILToTensor(), T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(img_size)])
    samples = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(), wds.to_tuple(IMAGE_KEYS))
    return torch.stack([view(decode_rgb(data)) for (data,), _ in zip(samples, range(count))])


def normalizer(mean, std, device):
    """uint8 (B, C, H, W) -> float normalised per channel, on `device` (constants made once)."""
    scale = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    return lambda batch: (batch.to(device, non_blocking=True).float() - shift) / scale
