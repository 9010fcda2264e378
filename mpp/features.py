"""Frozen-encoder features, shared by the linear probe, kNN and pretraining's online kNN.

A feature is the class token or the mean of the patch tokens of the last `blocks` blocks, each
through the encoder's final LayerNorm, concatenated (MAE's probe: the class token of the last
block). `extract_features` runs an exact loader (the evaluation plan: every sample once, padded
batches with a valid mask) on every process, gathers the batches and puts them in the order of
the shards' samples, so every process holds the same matrix and it does not depend on the
number of processes or loader workers.
"""
from __future__ import annotations

import torch
from accelerate.utils import gather_object

from mpp.data import ShardLoader
from mpp.data.loader import EpochPlan, split_batches
from mpp.recipe import ConfigError


def pooled_features(vit, x: torch.Tensor, pool: str, blocks: int) -> torch.Tensor:
    """(B, blocks * width): the encoder's own `pooled_features` for the last `blocks` blocks (a ViT: per block,
    the class token (pool="cls") or the mean patch token (pool="mean") after the final norm; VT: per VT module,
    the mean token), oldest first."""
    depth = len(vit.blocks)
    if not 1 <= blocks <= depth:
        raise ConfigError(f"features.blocks={blocks}: the encoder has {depth} blocks; choose 1 to {depth}")
    if pool not in ("cls", "mean"):
        raise ConfigError(f"features.pool={pool!r}: choose cls or mean")
    if pool == "cls" and not getattr(vit, "num_prefix_tokens", 0):
        raise ConfigError("features.pool=cls: the encoder has no class token; use features.pool=mean")
    return vit.pooled_features(x, pool, blocks)


@torch.no_grad()
def extract_features(accelerator, vit, loader: ShardLoader, to_input, pool: str, blocks: int, *,
                     with_keys: bool = False):
    """(features float32 CPU (N, F), labels int64 (N,)[, keys]) of one epoch of an exact loader, the same on
    every process (collective: all call it), in the shards' sample order, every sample exactly once.

    The evaluation plan gives rank r the contiguous range [start_r, start_r + len_r) of the samples;
    its batch b is loader worker b % K's batch b // K, and worker w holds the batches p = (batches of
    workers before w) + b // K, i.e. samples start_r + p*B ... of the range (padding only past its
    end). Each gathered batch is written straight to those rows of one preallocated matrix; rows
    of samples that could not be read (valid False) are dropped at the end.
    """
    if loader.training:
        raise ValueError("extract_features needs an exact loader (mode eval, or exact=True)")
    W, B, K = accelerator.num_processes, loader.batch_size, loader.workers
    if loader.world_size != W:
        raise ValueError(f"the loader was made for {loader.world_size} process(es), the run has {W}")
    ranges = []
    for r in range(W):
        plan = EpochPlan(loader.urls, loader.counts, epoch=loader.epoch, seed=loader.seed, rank=r, world_size=W,
                         workers=K, batch_size=B, training=False)
        ranges.append((plan.rank_start, plan.rank_len))
    first = [sum(split_batches(len(loader), K)[:w]) for w in range(K)]
    n = loader.num_samples
    features, labels = None, torch.full((n,), -1, dtype=torch.int64)
    valid, keys = torch.zeros(n, dtype=torch.bool), [""] * n
    modes = {m: m.training for m in vit.modules()}  # put back as they were (pretraining's online kNN)
    vit.eval()
    seen = 0
    try:
        for b, batch in enumerate(loader):
            with accelerator.autocast():
                feats = pooled_features(vit, to_input(batch["image"]), pool, blocks).float()
            meta = torch.stack([batch["label"], batch["valid"].long()], dim=1).to(feats.device)
            feats, meta = accelerator.gather((feats.contiguous(), meta))
            feats, meta = feats.view(W, B, -1).cpu(), meta.view(W, B, 2).cpu()
            batch_keys = gather_object([list(batch["key"])]) if with_keys else None
            if features is None:
                features = torch.empty(n, feats.shape[-1])
            offset = (first[b % K] + b // K) * B  # in the rank's range
            for r, (start, length) in enumerate(ranges):
                take = min(B, length - offset)
                if take <= 0:
                    continue
                rows = slice(start + offset, start + offset + take)
                features[rows], labels[rows], valid[rows] = feats[r, :take], meta[r, :take, 0], meta[r, :take, 1] > 0
                if with_keys:
                    keys[rows] = batch_keys[r][:take]
            seen += 1
    finally:
        for module, training in modes.items():
            module.training = training
    if seen != len(loader):
        raise RuntimeError(f"the loader yielded {seen} of {len(loader)} batches")
    if not valid.all():
        accelerator.print(f"note: {int((~valid).sum())} of {n} samples of {loader.spec!r} could not be read and "
                          f"are left out")
        features, labels = features[valid], labels[valid]
        keys = [k for k, ok in zip(keys, valid.tolist()) if ok]
    return (features, labels, keys) if with_keys else (features, labels)
