"""What an evaluation script (linear probe, kNN) sets up before it extracts features: its required settings,
its accelerator and its exact loaders."""
from __future__ import annotations

from accelerate import Accelerator, PartialState

from mpp.data import ShardLoader
from mpp.recipe import ConfigError
from mpp.runtime import cpu_ddp, resolve_settings, set_cpu_threads


def require_ckpt(ckpt, script: str, recipe: str = "RECIPE") -> None:
    """An evaluation must say what it evaluates: a checkpoint, or `none` for the random-init baseline."""
    if ckpt is None:
        raise ConfigError(f"ckpt is not set: pass ckpt=PATH (a checkpoint folder, a run folder or an exported "
                          f".safetensors) or ckpt=none (a randomly initialised encoder, the baseline), e.g.\n"
                          f"  accelerate launch mpp/{script} {recipe} ckpt=runs/quickstart")


def require_data(data_cfg, script: str, recipe: str = "RECIPE") -> None:
    if data_cfg.train is None:
        raise ConfigError(f"data.train is not set: point it at labelled shards (data_tools output), e.g.\n"
                          f"  accelerate launch mpp/{script} {recipe} data.train=mpp/sample_data/cifar10 ckpt=...")


def eval_accelerator(cfg) -> Accelerator:
    """The accelerator of an evaluation script: gloo DDP when launched as several CPU processes, this process's
    share of the cores on a CPU, and cfg.mixed_precision resolved in place (the training jobs' rules, mpp/runtime.py)."""
    resolve_settings(cfg, PartialState(cpu=cpu_ddp()))
    accelerator = Accelerator(cpu=cpu_ddp(), mixed_precision=cfg.mixed_precision)
    set_cpu_threads(cfg, accelerator.device)  # cfg.cpu_threads
    return accelerator


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
