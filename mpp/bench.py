"""Benchmarks that others can rerun; README's performance figures come from here.

    python -m mpp.bench train [RECIPE] [key=value ...] [--steps N] [--warmup N] [--json]

`train` times pretraining steps of the recipe's model (default recipes/base.yaml) on synthetic
uint8 images of its shape, through the same build_training/train_step as mpp/pretrain.py, with
one micro-batch of train.micro_batch_size per step and the recipe's mixed precision.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from mpp.config import ConfigError, PretrainConfig, load_config
from mpp.data import normalizer
from mpp.flops import device_peak_flops, train_flops_per_image
from mpp.pretrain import Schedule, build_training, effective_precision, set_cpu_threads, train_step

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "base.yaml"


def bench_train(cfg: PretrainConfig, steps: int, warmup: int) -> dict:
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device, batch = accelerator.device, cfg.train.micro_batch_size
    set_cpu_threads(cfg, device)
    plan = Schedule(grad_accum=1, steps_per_epoch=1, total_steps=warmup + steps + 1, warmup_steps=1,
                    lr=cfg.optim.base_lr * batch / 256)
    model, optimizer, _ = build_training(cfg, plan, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    to_input = normalizer(cfg.data.mean, cfg.data.std, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    no_stop = torch.zeros((), device=device)

    def step():
        return train_step(accelerator, model, optimizer, [to_input(images)], cfg.train.grad_clip, no_stop)[0]

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()  # returns a Python float: each step ends synchronised
    seconds = (time.perf_counter() - start) / steps
    flops = train_flops_per_image(accelerator.unwrap_model(model), cfg.model.img_size, cfg.model.in_chans, device)
    peak = device_peak_flops(device, cfg.train.mixed_precision, cfg.log.peak_tflops)
    images_per_s = batch / seconds
    result = {
        "bench": "train",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "model": f"{cfg.model.objective} vit-{cfg.model.encoder}/{cfg.model.patch_size} @{cfg.model.img_size}",
        "decoder": f"{cfg.model.decoder_dim}x{cfg.model.decoder_depth}",
        "batch": batch,
        "mixed_precision": effective_precision(accelerator),
        "fused_attn": cfg.train.fused_attn,
        "steps": steps,
        "step_s": seconds,
        "img_per_s": images_per_s,
        "gflop_per_img": flops / 1e9,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": images_per_s * flops / peak if peak else None,
        "final_loss": loss,
    }
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpp.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    train = sub.add_parser("train", help="pretraining steps on synthetic input of the recipe's shape")
    train.add_argument("args", nargs="*", help="[RECIPE] key=value ...")
    train.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    train.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    recipe, overrides = DEFAULT_RECIPE, args.args
    if overrides and "=" not in overrides[0]:
        recipe, overrides = overrides[0], overrides[1:]
    try:
        cfg = load_config(PretrainConfig, recipe, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = bench_train(cfg, args.steps, args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
