"""Benchmarks that others can rerun; README's performance figures come from here.

    python -m mpp.bench train [RECIPE] [key=value ...] [--steps N] [--warmup N] [--rounds N] [--baseline] [--json]
    python -m mpp.bench precision [--json]
    python -m mpp.bench loader SPEC [--img-size 224] [--workers 1 2] [--batch 64] [--limit N] [--json]
    python -m mpp.bench views [--batch 128] [--img-size 32] [--json]
    python -m mpp.bench adamw [RECIPE] [key=value ...] [--json]

`train` times pretraining steps of the recipe's model (default recipes/base.yaml) on synthetic
uint8 images of its shape, through the same build_training/train_step as mpp/pretrain.py, with
one micro-batch of train.micro_batch_size per step and the recipe's mixed precision, resolved as a run
resolves it (`auto`: mpp/runtime.py; printed with its reason); train.compile=auto is not compiled here (a run
decides from a trial of its first steps). img/s is the median of --rounds blocks of --steps steps. --baseline
alternates those blocks with a plain PyTorch loop over the same model (`plain_loop`: no accelerate, torch's
default AdamW, the same autocast) and prints the ratio mpp/plain, the yardstick of every figure.

`precision` prints this device's fp32 / bf16 / fp16 matmul rates (TF32 too on GPUs) and what
`mixed_precision: auto` picks here.

`loader` times the data pipeline on real shards, in one run: the decode-only rate of the same
JPEGs (PIL open + convert to RGB, bytes read from the shards beforehand so no IO is counted: the
ceiling of one worker), then for each worker count the pretrain-mode ShardLoader and a naive
`webdataset ... .decode("pil")` + torchvision transforms pipeline, in images/s per worker and in total,
and where one image's time goes (decode, crop + resize, tar read, the rest of the loader), stage by stage.

`views` times the contrastive term's second view on a batch: mpp's batched `random_view` against
torchvision's v2 transforms called per image.

`adamw` times one optimizer step over the recipe's model (random gradients): torch's fused AdamW kernel,
which mpp uses, against the per-tensor loop that torch otherwise runs on CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import statistics
from typing import Callable

import torch
from accelerate import Accelerator, PartialState

from mpp.config import PretrainConfig
from mpp.data import normalizer
from mpp.engine import Schedule
from mpp.flops import Utilisation, device_peak_flops, measured_matmul_peak, train_flops_per_image
from mpp.lr_schedule import scaled_lr
from mpp.pretrain import build_training, train_step
from mpp.recipe import ConfigError, load_config
from mpp.runtime import (PRECISION_DTYPES, dynamo_backend, effective_precision, fused_attn, resolve_precision,
                         resolve_settings, set_cpu_threads)

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "base.yaml"


def plain_loop(cfg: PretrainConfig, device: torch.device, precision: str, lr: float) -> Callable:
    """The yardstick of `bench train --baseline`: the recipe's model in a plain PyTorch loop, as a user would write
    it. Built as timm builds it (timm's default attention kernel), called through pretraining's own loss function;
    torch's default AdamW (the recipe's lr, betas and weight decay, on every tensor); the same autocast precision
    (fp16: torch's grad scaler); forward, backward, step, zero_grad. No accelerate, no checks. Returns step(imgs)."""
    from mpp import pretrain
    from mpp.models import build_model

    model = build_model(cfg.model, cfg.data.mean, cfg.data.std).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = pretrain.pretrain_loss(model, imgs)
        loss = loss[0] if isinstance(loss, tuple) else loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_train(cfg: PretrainConfig, steps: int, warmup: int, rounds: int = 3, baseline: bool = False) -> dict:
    """Images/s of mpp's training step (one micro-batch per step), the median of `rounds` blocks of `steps` steps;
    with `baseline`, blocks of the plain loop alternate with mpp's (mpp, plain, plain, mpp, ...), so that the host's
    drift hits both alike, and the ratio of the medians is reported."""
    state = PartialState()
    resolve_settings(cfg, state, say=lambda line: None)  # the reasons go into the result
    if cfg.train.compile == "auto":  # a run decides from a trial of its first steps; a bench is too short for one
        cfg.train.compile = False
        cfg.resolved.compile = ("auto → no in the bench (a run decides from a trial of its first steps; "
                                "train.compile=true times compiled steps)")
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, dynamo_backend=dynamo_backend(cfg))
    device, batch = accelerator.device, cfg.train.micro_batch_size
    set_cpu_threads(cfg, device)
    plan = Schedule(grad_accum=1, steps_per_epoch=1, total_steps=10 ** 9, warmup_steps=1,
                    lr=scaled_lr(cfg.optim.base_lr, batch))
    torch.manual_seed(cfg.seed)
    model, optimizer, scheduler = build_training(cfg, plan, device)
    scheduler.step_update(plan.warmup_steps)  # the peak lr, which the plain loop runs at too
    model, optimizer = accelerator.prepare(model, optimizer)
    precision = effective_precision(accelerator)
    to_input = normalizer(cfg.data.mean, cfg.data.std, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    no_stop = torch.zeros((), device=device)

    def mpp_step():
        return train_step(accelerator, model, optimizer, [to_input(images)], cfg.train.grad_clip, no_stop)[0]

    variants = {"mpp": mpp_step}
    if baseline:
        torch.manual_seed(cfg.seed)
        plain = plain_loop(cfg, device, precision, plan.lr)
        variants["plain"] = lambda: plain(to_input(images))

    def synchronise(out):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(out)  # mpp's step returns a float already: each of its steps ends synchronised

    for fn in variants.values():
        for _ in range(warmup):
            synchronise(fn())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = {name: [] for name in variants}
    losses = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            start = time.perf_counter()
            for _ in range(steps):
                out = variants[name]()
            losses[name] = synchronise(out)
            rates[name].append(batch * steps / (time.perf_counter() - start))
    eager = accelerator.unwrap_model(model, keep_torch_compile=False)
    flops = train_flops_per_image(eager, cfg.model.img_size, cfg.model.in_chans, device)
    mfu = Utilisation(lambda: device_peak_flops(device, precision, cfg.log.peak_tflops),
                      remeasure=device.type == "cpu" and not cfg.log.peak_tflops)
    images_per_s = statistics.median(rates["mpp"])
    result = {
        "bench": "train",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu x{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}",
        "model": (f"{cfg.model.objective} {'vit-' if cfg.model.tokenizer == 'patch' else cfg.model.tokenizer + ' '}"
                  f"{cfg.model.encoder}/{cfg.model.patch_size} @{cfg.model.img_size}"),
        "target": cfg.model.target.kind,
        "decoder": f"{cfg.model.decoder.dim}x{cfg.model.decoder.depth}" if cfg.model.objective == "mae" else "linear",
        "batch": batch,
        "mixed_precision": precision,
        "precision_reason": cfg.resolved.mixed_precision,
        "compile": cfg.train.compile,
        "compile_reason": cfg.resolved.compile,
        "fused_attn": fused_attn(cfg, device),
        "steps": steps,
        "rounds": rounds,
        "step_s": batch / images_per_s,
        "img_per_s": images_per_s,
        "img_per_s_rounds": rates["mpp"],
        "gflop_per_img": flops / 1e9,
        "peak_tflops": mfu.peak / 1e12 if mfu.peak else None,
        "mfu": mfu(images_per_s * flops),
        "final_loss": losses["mpp"],
    }
    if baseline:
        plain_per_s = statistics.median(rates["plain"])
        result.update(plain_img_per_s=plain_per_s, plain_img_per_s_rounds=rates["plain"],
                      plain_fused_attn=timm_fused_attn(), plain_final_loss=losses["plain"],
                      mpp_over_plain=images_per_s / plain_per_s)
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def timm_fused_attn() -> bool:
    """Whether timm builds its attention layers with torch's fused kernel (its default; TIMM_FUSED_ATTN=0 turns it off)."""
    from timm.layers import use_fused_attn
    return use_fused_attn()


def bench_precision(cfg: PretrainConfig) -> dict:
    """This device's matmul rates in each precision (large square matmuls, best of 5) and what
    `mixed_precision: auto` picks here, with its reason (from its own short probe)."""
    device = PartialState().device
    set_cpu_threads(cfg, device)
    names = ["fp32", "bf16", "fp16"]
    rates = {}
    if device.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        rates["fp32"] = measured_matmul_peak(device, torch.float32)
        if torch.cuda.get_device_capability(device) >= (8, 0):
            torch.backends.cuda.matmul.allow_tf32 = True
            rates["tf32"] = measured_matmul_peak(device, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = saved
        names = names[1:]
    for name in names:
        rates[name] = measured_matmul_peak(device, PRECISION_DTYPES[name])
    decision = resolve_precision("auto", device)
    return {"bench": "precision",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu x{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}",
            **{f"{name}_gflops": rate / 1e9 for name, rate in rates.items()},
            "auto": decision.value, "auto_reason": decision.reason}


def _worker_cpu_seconds() -> float:
    """CPU seconds used so far by this process's live child processes (the loader workers), from /proc."""
    import multiprocessing
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return float("nan")
    return total


def _timed_batches(batches, limit: int, skip: int) -> dict:
    """Images/s over the batches after the first `skip` (worker start-up), stopping once `limit` images are timed;
    also the workers' CPU time per image, which other work on the machine disturbs less than the wall clock."""
    images, start, seen, cpu = 0, None, 0, 0.0
    for batch in batches:
        size = len(batch[0] if isinstance(batch, (tuple, list)) else batch["image"])
        seen += 1
        if seen <= skip:
            if seen == skip:
                start, cpu = time.perf_counter(), _worker_cpu_seconds()
            continue
        if start is None:
            start, cpu = time.perf_counter(), _worker_cpu_seconds()
        images += size
        if images >= limit:
            break
    seconds = time.perf_counter() - start if start is not None else float("nan")
    cpu = _worker_cpu_seconds() - cpu
    if hasattr(batches, "close"):  # stop the loader's workers now, not whenever it is collected
        batches.close()
    elif hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds if images else float("nan"),
            "worker_cpu_ms_per_img": 1e3 * cpu / images if images and cpu > 0 else float("nan")}


def bench_loader(spec, img_size: int, workers: list[int], batch: int, limit: int, split: str = "train",
                 shuffle_buffer: int = 1000, trials: int = 3) -> dict:
    """Each rate is the best of `trials` runs (other work on the machine only ever slows a run down)."""
    import io
    import itertools
    import random

    import webdataset as wds
    from PIL import Image
    from torchvision.transforms import v2 as T

    from mpp.config import IMAGENET_MEAN, IMAGENET_STD
    from mpp.data import ShardLoader, resolve_shards
    from mpp.data.decode import CropTransform, _decode_crop, _decode_jpeg_tensor, crop_bounds, jpeg_size
    from mpp.data.shards import read_slice

    torch.set_num_threads(1)
    urls = resolve_shards(spec, split).urls
    jpegs = []
    for url in urls:
        for sample in read_slice(url):
            data = sample.get("jpg") or sample.get("jpeg")
            if data is not None:
                jpegs.append(data)
            if len(jpegs) >= limit:
                break
        if len(jpegs) >= limit:
            break

    def rate(fn) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        for data in jpegs:
            fn(data)
        return {"img_per_s": len(jpegs) / (time.perf_counter() - start),
                "cpu_ms_per_img": 1e3 * (time.process_time() - cpu_start) / len(jpegs)}

    def best(runs: list[dict], k: int = 1) -> dict:
        top = dict(max(runs, key=lambda r: r["img_per_s"]))
        for key in ("cpu_ms_per_img", "worker_cpu_ms_per_img"):
            if key in top:
                top[key] = min(r[key] for r in runs)
        top["per_worker"] = top["img_per_s"] / max(k, 1)
        return top

    def decode_with_pil(data):
        return Image.open(io.BytesIO(data)).convert("RGB")

    for data in jpegs[:20]:  # warm caches
        decode_with_pil(data)
    # The pretrain transform's two stages, each alone: decoding (the crop region only, where mpp's extension is
    # built; else the whole image), then crop + flip + resize into a batch slot, on pixels decoded beforehand.
    transform = CropTransform(img_size, "random")
    slot = torch.empty(1, img_size, img_size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)[0]  # as in a batch
    crop_rng, crops = random.Random(0), []
    for data in jpegs[:512]:  # decoded, 0.4 MB each at 320 px
        width, height = jpeg_size(data) or _decode_jpeg_tensor(data).shape[:0:-1]
        box = transform.box(width, height, crop_rng)
        crops.append((data, crop_bounds(box, height, width), box, crop_rng.random() < 0.5))
    region_decoder = _decode_crop is not None

    def time_decode() -> float:
        start = time.process_time()
        for data, bounds, _, flip in crops:
            if region_decoder:
                transform._decode_region(data, bounds, flip)
            else:
                _decode_jpeg_tensor(data)
        return 1e3 * (time.process_time() - start) / len(crops)

    if region_decoder:
        decoded = [(transform._decode_region(data, bounds, flip).clone(memory_format=torch.channels_last), None, None)
                   for data, bounds, _, flip in crops]
    else:
        decoded = [(_decode_jpeg_tensor(data), box, flip) for data, _, box, flip in crops]

    def time_crop() -> float:
        start = time.process_time()
        for pixels, box, flip in decoded:
            if box is None:  # a decoded region, flipped already
                transform._resize(pixels, slot)
            else:
                transform.crop(pixels, box, flip, out=slot)
        return 1e3 * (time.process_time() - start) / len(crops)

    def read_tar():
        start, count = time.perf_counter(), 0
        for url in urls:
            count += sum(1 for _ in itertools.islice(read_slice(url), limit - count))
            if count >= limit:
                break
        return 1e3 * (time.perf_counter() - start) / max(count, 1)

    naive_transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToImage(), T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    result = {"bench": "loader", "spec": str(spec), "shards": len(urls), "img_size": img_size, "batch": batch,
              "limit": limit, "trials": trials, "cpus": len(os.sched_getaffinity(0)),
              "pipeline": {}, "naive": {}}

    def pipeline(k):
        return ShardLoader(spec, mode="pretrain", batch_size=batch, img_size=img_size, split=split, num_workers=k,
                           shuffle_buffer=shuffle_buffer, seed=0, rank=0, world_size=1, pin_memory=False).forever()

    def naive(k):
        stages = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
                  .repeat().decode("pil").to_tuple("jpg").map_tuple(naive_transform).batched(batch))
        return iter(wds.WebLoader(stages, batch_size=None, num_workers=k))

    # Trials interleaved (ceiling, then each pipeline, then again), so that a slow spell of the host, which
    # comes and goes over minutes here, lowers the ceiling as often as the pipelines rather than only one.
    runs = {"pil": [], "tv": [], **{("pipe", k): [] for k in workers}, **{("naive", k): [] for k in workers}}
    for _ in range(trials):
        runs["pil"].append(rate(decode_with_pil))
        runs["tv"].append(rate(_decode_jpeg_tensor))
        for k in workers:
            runs["pipe", k].append(_timed_batches(pipeline(k), limit, skip=max(k, 1)))
            runs["naive", k].append(_timed_batches(naive(k), limit, skip=max(k, 1)))
    decode_pil, decode_tv = best(runs["pil"]), best(runs["tv"])
    decode_pil["what"] = "PIL open + convert('RGB') of the same JPEG bytes, one process"
    result["decode_only"], result["decode_only_torchvision"] = decode_pil, decode_tv
    for k in workers:
        pipe = result["pipeline"][str(k)] = best(runs["pipe", k], k)
        timed = result["naive"][str(k)] = best(runs["naive", k], k)
        pipe["of_ceiling"] = pipe["per_worker"] / decode_pil["img_per_s"]
        pipe["of_ceiling_cpu"] = decode_pil["cpu_ms_per_img"] / pipe["worker_cpu_ms_per_img"]
        pipe["vs_naive"] = pipe["img_per_s"] / timed["img_per_s"]
    # Where a worker's time per image goes: each stage timed alone in this process; "rest" is the rest of the
    # workers' CPU time (shuffle buffer, sample dicts, crop draws, batching, handing batches over).
    worker_ms = min(pipe["worker_cpu_ms_per_img"] for pipe in result["pipeline"].values())
    tar_ms = min(read_tar() for _ in range(trials))
    resize_ms = min(time_crop() for _ in range(trials))
    decode_ms = min(time_decode() for _ in range(trials))
    result["breakdown_ms_per_img"] = {"decoder": "region" if region_decoder else "torchvision", "decode": decode_ms,
                                      "crop_resize": resize_ms, "tar_read": tar_ms, "worker": worker_ms,
                                      "rest": worker_ms - decode_ms - resize_ms - tar_ms}
    return result


def print_loader(result: dict) -> None:
    print(f"loader bench: {result['spec']} ({result['shards']} shards), {result['img_size']} px, batch "
          f"{result['batch']}, {result['limit']} images per measurement, best of {result['trials']}, "
          f"{result['cpus']} CPUs")
    for name, label in [("decode_only", "decode-only (PIL), the ceiling"), ("decode_only_torchvision",
                                                                          "decode-only (torchvision)")]:
        rate = result[name]
        print(f"  {label:<31} {rate['img_per_s']:8.1f} img/s   {rate['cpu_ms_per_img']:.3f} CPU ms/img")
    print(f"  {'workers':>7}  {'pipeline/worker':>15}  {'pipeline total':>14}  {'naive total':>11}  "
          f"{'of ceiling':>10}  {'vs naive':>8}  {'worker CPU ms/img':>17}  {'of ceiling (CPU)':>16}")
    for k, pipe in result["pipeline"].items():
        naive = result["naive"][k]
        print(f"  {k:>7}  {pipe['per_worker']:15.1f}  {pipe['img_per_s']:14.1f}  {naive['img_per_s']:11.1f}  "
              f"{pipe['of_ceiling']:10.0%}  {pipe['vs_naive']:7.2f}x  {pipe['worker_cpu_ms_per_img']:17.3f}  "
              f"{pipe['of_ceiling_cpu']:16.0%}")
    print("  (wall-clock rates: the best of the trials; CPU times: the workers' own, less disturbed by other load)")
    parts = result["breakdown_ms_per_img"]
    if parts["decoder"] == "region":  # the decoder crops and flips
        stages = f"decode of the crop region (and flip) {parts['decode']:.3f} ms, resize {parts['crop_resize']:.3f}"
    else:
        stages = f"torchvision decode {parts['decode']:.3f} ms, crop + flip + resize {parts['crop_resize']:.3f}"
    print(f"  one image, stage by stage: {stages}, tar read {parts['tar_read']:.3f}, the rest {parts['rest']:.3f} "
          f"(a worker's CPU time per image: {parts['worker']:.3f} ms)")


def bench_views(batch: int, img_size: int, trials: int = 5) -> dict:
    """The contrastive term's second view: mpp's batched random_view against torchvision's v2 transforms
    (the same crop, flip, colour jitter without hue, and grey), which draw one set of parameters per call and need
    a call per image. Best of `trials`, in ms per batch."""
    from torchvision.transforms import v2 as T

    from mpp.models.views import random_view

    imgs = torch.rand(batch, 3, img_size, img_size)
    per_image = T.Compose([T.RandomResizedCrop(img_size, scale=(0.25, 1.0), antialias=False),
                           T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4)], p=0.8),
                           T.RandomGrayscale(0.2)])
    candidates = {"random_view_ms": lambda: random_view(imgs),
                  "torchvision_per_image_ms": lambda: torch.stack([per_image(img) for img in imgs])}
    result = {"batch": batch, "img_size": img_size}
    for name, fn in candidates.items():
        fn()
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = 1e3 * min(times)
    return result


def bench_adamw(cfg: PretrainConfig, steps: int = 20, trials: int = 3) -> dict:
    """ms per optimizer.step() of mpp's AdamW on the recipe's model, fused and as a per-tensor loop; best of
    `trials` runs of `steps` steps, on the CPU."""
    from mpp.engine import adamw
    from mpp.models import build_model

    set_cpu_threads(cfg, torch.device("cpu"))
    model = build_model(cfg.model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # what the optimizer holds
    for p in trainable:
        p.grad = torch.randn_like(p)
    result = {"tensors": len(trainable), "threads": torch.get_num_threads()}
    for name, fused in (("fused_ms", True), ("per_tensor_ms", False)):
        optimizer = adamw(model, 1e-4, cfg.optim, torch.device("cpu"))
        for group in optimizer.param_groups:
            group["fused"] = fused
        optimizer.step()
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            times.append((time.perf_counter() - start) / steps)
        result[name] = 1e3 * min(times)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpp.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    train = sub.add_parser("train", help="pretraining steps on synthetic input of the recipe's shape")
    train.add_argument("args", nargs="*", help="[RECIPE] key=value ...")
    train.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    train.add_argument("--rounds", type=int, default=3, help="timed blocks of --steps steps; the median counts (default 3)")
    train.add_argument("--baseline", action="store_true",
                       help="alternate the blocks with a plain PyTorch loop over the same model; print the ratio")
    train.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    loader = sub.add_parser("loader", help="images/s of the data pipeline against decode-only and a naive pipeline")
    loader.add_argument("spec", help="shard spec: data_tools folder or manifest, brace pattern, folder of tars")
    loader.add_argument("--img-size", type=int, default=224)
    loader.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (default 1 2)")
    loader.add_argument("--batch", type=int, default=64)
    loader.add_argument("--limit", type=int, default=2000, help="images per measurement (default 2000)")
    loader.add_argument("--split", default="train", help="manifest split (default train)")
    loader.add_argument("--shuffle-buffer", type=int, default=1000)
    loader.add_argument("--trials", type=int, default=3, help="runs of each measurement; the best counts (default 3)")
    loader.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    views = sub.add_parser("views", help="the contrastive term's second view: batched against per-image torchvision")
    views.add_argument("--batch", type=int, default=128)
    views.add_argument("--img-size", type=int, default=32)
    views.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    precision = sub.add_parser("precision", help="matmul rates in fp32 / bf16 / fp16 and what mixed_precision=auto picks")
    precision.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    adamw = sub.add_parser("adamw", help="one AdamW step over the recipe's model: fused against per tensor")
    adamw.add_argument("args", nargs="*", help="[RECIPE] key=value ...")
    adamw.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    if args.bench == "views":
        result = bench_views(args.batch, args.img_size)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>24}: {v:.4g}" for k, v in result.items()))
        return 0

    if args.bench == "loader":
        try:
            result = bench_loader(args.spec, args.img_size, args.workers, args.batch, args.limit, args.split,
                                  args.shuffle_buffer, args.trials)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result))
        else:
            print_loader(result)
        return 0

    recipe, overrides = DEFAULT_RECIPE, getattr(args, "args", [])
    if overrides and "=" not in overrides[0]:
        recipe, overrides = overrides[0], overrides[1:]
    try:
        cfg = load_config(PretrainConfig, recipe, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.bench == "train":
        result = bench_train(cfg, args.steps, args.warmup, args.rounds, args.baseline)
    elif args.bench == "precision":
        result = bench_precision(cfg)
    else:
        result = bench_adamw(cfg)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if isinstance(value, list):
                value = ", ".join(f"{v:.4g}" for v in value)
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
