"""FLOPs per training image and the device's peak, for model FLOPs utilisation (MFU).

Training FLOPs are 3x the forward's (backward costs twice the forward), counted by torch's
FlopCounterMode on a real forward, so any objective or tokenizer is counted without a formula.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
    "L4": 121e12, "A10": 125e12, "V100": 125e12, "RTX 4090": 165e12, "B200": 2250e12,
}


def train_flops_per_image(model: torch.nn.Module, img_size: int, in_chans: int, device) -> float:
    imgs = torch.randn(2, in_chans, img_size, img_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(imgs)
    return 3 * counter.get_total_flops() / imgs.shape[0]


def measured_matmul_peak(device, dtype: torch.dtype, size: int = 2048, trials: int = 5) -> float:
    """FLOP/s of a large square matmul, the best of a few trials (one trial varies by 20% on a
    shared CPU): the ceiling a CPU reaches, where no datasheet figure applies."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def device_peak_flops(device: torch.device, mixed_precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: the override, else the GPU's datasheet figure, else (CPU) the measured matmul peak."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
        # fp32 runs without tensor cores at roughly 1/15 of the bf16 peak on these parts: MFU is not comparable.
        return peak if mixed_precision in ("bf16", "fp16") else None
    if device.type == "cpu":
        return measured_matmul_peak(device, torch.bfloat16 if mixed_precision == "bf16" else torch.float32)
    return None
