"""Features kept on disk between evaluation runs (probe.cache=disk): the probe and kNN of one checkpoint share
one extraction, and a rerun reads it back. A file is named by a digest of everything the features depend on,
so a changed checkpoint, shard, crop or setting never reads stale features.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mpp.data import ShardLoader
from mpp.features import extract_features
from mpp.fileio import atomic_path
from mpp.recipe import to_dict
from mpp.runtime import effective_precision
from mpp.weights import is_random_init, weights_file

CACHE_VERSION = 2  # bump when what a feature is changes, so old disk caches are not reused


def _weights_stamp(ckpt) -> dict:
    """What identifies the weights a ckpt stands for: the resolved weights file, its size and mtime."""
    if ckpt is None or is_random_init(ckpt):
        return {"ckpt": "none"}
    path = weights_file(ckpt)
    stat = path.stat()
    return {"ckpt": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def feature_fingerprint(ckpt, model_cfg, loader: ShardLoader, mean, std, feature_cfg, precision: str,
                        seed: int) -> str:
    """A digest of everything the features depend on: the weights (a random-init encoder: its seed), the
    model, the shards (local ones by size and mtime too), the crop, the normalisation, the pooling and the
    precision the encoder ran in."""
    shards = []
    for url, count in zip(loader.urls, loader.counts):
        entry = {"url": url, "count": count}
        if Path(url).is_file():
            stat = Path(url).stat()
            entry.update(url=str(Path(url).resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        shards.append(entry)
    what = {"version": CACHE_VERSION, "weights": _weights_stamp(ckpt), "model": to_dict(model_cfg),
            "shards": shards, "mode": loader.mode, "img_size": loader.img_size,
            "crop_pct": getattr(loader.transform, "crop_pct", None), "mean": list(mean), "std": list(std),
            "features": to_dict(feature_cfg), "precision": precision, "seed": seed if is_random_init(ckpt) else None}
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=10).hexdigest()


def eval_features(cfg, accelerator, vit, loader: ShardLoader, to_input, name: str):
    """Features of an exact centre-crop loader for an EvalConfig run: extracted, or with probe.cache=disk
    read from / saved to output_dir/features/<name>-<fingerprint>.pt (kNN and the probe share them)."""
    path = None
    if cfg.probe.cache == "disk":
        fingerprint = feature_fingerprint(cfg.ckpt, cfg.model, loader, cfg.data.mean, cfg.data.std, cfg.features,
                                          effective_precision(accelerator), cfg.seed)
        path = Path(cfg.output_dir) / "features" / f"{name}-{fingerprint}.pt"
    return cached_features(accelerator, path, lambda: extract_features(
        accelerator, vit, loader, to_input, cfg.features.pool, cfg.features.blocks))


def cached_features(accelerator, path: Path | None, extract):
    """`extract()` (collective), or the features saved at `path` by an earlier run; saves them there if
    new (main process; temporary file renamed into place, so a killed run leaves no half file).
    path None: no disk cache."""
    if path is None:
        return extract()
    # Every process must take the same branch (extraction is collective): load only if all can read it.
    here = torch.tensor([float(path.is_file())], device=accelerator.device)
    if accelerator.gather(here).min().item() > 0:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        accelerator.print(f"features: {path} (cached)")
        return saved["features"], saved["labels"]
    features, labels = extract()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"features": features, "labels": labels}, tmp)
    accelerator.wait_for_everyone()
    return features, labels
