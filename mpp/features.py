"""Frozen-encoder features, shared by the linear probe, kNN and pretraining's online kNN.

A feature is the class token or the mean of the patch tokens of the last `blocks` blocks, each
through the encoder's final LayerNorm, concatenated (MAE's probe: the class token of the last
block). `extract_features` runs an exact loader (the evaluation plan: every sample once, padded
batches with a valid mask) on every process, gathers the batches and puts them in the order of
the shards' samples, so every process holds the same matrix and it does not depend on the
number of processes or loader workers.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from mpp.config import ConfigError, to_dict
from mpp.runtime import cpu_ddp, effective_precision, resolve_settings, set_cpu_threads
from mpp.data import ShardLoader
from mpp.data.loader import EpochPlan, split_batches
from mpp.fileio import atomic_path
from mpp.models import build_encoder as build_model_encoder, build_model

CACHE_VERSION = 2  # bump when what a feature is changes, so old disk caches are not reused (2: MAE-init baseline)


def is_random_init(ckpt) -> bool:
    return ckpt is not None and str(ckpt).lower() == "none"


def require_ckpt(ckpt, script: str, recipe: str = "RECIPE") -> None:
    """An evaluation must say what it evaluates: a checkpoint, or `none` for the random-init baseline."""
    if ckpt is None:
        raise ConfigError(f"ckpt is not set: pass ckpt=PATH (a checkpoint folder, a run folder or an exported "
                          f".safetensors) or ckpt=none (a randomly initialised encoder, the baseline), e.g.\n"
                          f"  accelerate launch mpp/{script} {recipe} ckpt=runs/quickstart")


def eval_accelerator(cfg) -> Accelerator:
    """The accelerator of an evaluation script: gloo DDP when launched as several CPU processes, this process's
    share of the cores on a CPU, and cfg.mixed_precision resolved in place (the training jobs' rules, mpp/runtime.py)."""
    resolve_settings(cfg, PartialState(cpu=cpu_ddp()))
    accelerator = Accelerator(cpu=cpu_ddp(), mixed_precision=cfg.mixed_precision)
    set_cpu_threads(cfg, accelerator.device)  # cfg.cpu_threads
    return accelerator


def build_encoder(model_cfg, ckpt) -> tuple[torch.nn.Module, list[str]]:
    """The recipe's encoder (timm VisionTransformer, eval mode, frozen) with `ckpt`'s weights; ckpt None or
    "none": random initialisation (seed it first), the baseline. The baseline is initialised as pretraining
    initialises it (model.objective's init, e.g. MAE's xavier): pretraining's starting point in distribution,
    not the same draw: pretraining builds its decoder before it initialises, which moves the generator. On
    CIFAR-10, timm's own init probed 31.4% and MAE's 36.2% (README, quality benchmark)."""
    if ckpt is None or is_random_init(ckpt):
        vit = build_model(model_cfg).encoder
        notes = [f"randomly initialised {model_cfg.encoder} encoder (ckpt=none, {model_cfg.objective}'s "
                 f"initialisation): the baseline"]
    else:
        vit = build_model_encoder(model_cfg)
        from mpp.weights import load_weights
        notes = load_weights(vit, str(ckpt))
    vit.requires_grad_(False)
    return vit.eval(), notes


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


def eval_loader(data_cfg, which: str, img_size: int, accelerator, *, seed: int = 0,
                augment: bool = False) -> ShardLoader:
    """An exact loader of `data_cfg`'s train or val split: centre crops (mode eval), or with augment the
    probe's random-resized crops + flips, drawn anew each epoch (`set_epoch`), still every sample once."""
    if which == "train":
        spec, split = data_cfg.train, data_cfg.train_split
    else:
        spec, split = (data_cfg.val if data_cfg.val is not None else data_cfg.train), data_cfg.val_split
    return ShardLoader(spec, mode="probe" if augment else "eval", exact=True, split=split,
                       batch_size=data_cfg.batch_size, img_size=img_size, num_workers=data_cfg.num_workers,
                       seed=seed, crop_pct=data_cfg.crop_pct, mean=data_cfg.mean, std=data_cfg.std,
                       rank=accelerator.process_index, world_size=accelerator.num_processes)


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


# ---- classes ----

def manifest_classes(spec) -> list[str] | None:
    """The class names a data_tools manifest lists for `spec`, if it has one."""
    from mpp.data.shards import _read_json, is_remote
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    for item in specs:
        item = str(item)
        if item.endswith(".json"):
            location = item
        elif not is_remote(item) and (Path(item) / "manifest.json").is_file():
            location = str(Path(item) / "manifest.json")
        else:
            continue
        try:
            classes = _read_json(location).get("classes")
        except (OSError, ValueError, AttributeError):
            continue
        if classes:
            return list(classes)
    return None


def class_count(spec, *label_sets: torch.Tensor) -> tuple[int, list[str]]:
    """(number of classes, notes): the manifest's class list, or the largest label + 1 when it has none."""
    labels = torch.cat([y.flatten() for y in label_sets])
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} samples of {spec!r} have no label (.cls): a probe and kNN need "
                         f"labelled shards (python -m data_tools.shard with class folders or a labelled source)")
    top = int(labels.max()) + 1 if len(labels) else 0
    classes = manifest_classes(spec)
    if classes is not None:
        if top > len(classes):
            raise ValueError(f"label {top - 1} of {spec!r} is past the manifest's {len(classes)} classes")
        return len(classes), []
    return top, [f"no class list in the shards' manifest: num_classes = largest label + 1 = {top}"]


# ---- disk cache ----

def _weights_stamp(ckpt) -> dict:
    """What identifies the weights a ckpt stands for: the resolved weights file, its size and mtime."""
    if ckpt is None or is_random_init(ckpt):
        return {"ckpt": "none"}
    from mpp.weights import weights_file
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


def require_data(data_cfg, script: str, recipe: str = "RECIPE") -> None:
    if data_cfg.train is None:
        raise ConfigError(f"data.train is not set: point it at labelled shards (data_tools output), e.g.\n"
                          f"  accelerate launch mpp/{script} {recipe} data.train=mpp/sample_data/cifar10 ckpt=...")


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
