"""FLOPs per training image and the device's peak, for model FLOPs utilisation (MFU).

Training FLOPs are 3x the forward's (backward costs twice the forward), counted by torch's
FlopCounterMode on a real forward, so any objective or tokenizer is counted without a formula.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from mpp.runtime import PRECISION_DTYPES, matmul_rate

# Dense bf16/fp16 tensor-core peaks (TF32: half of these) from the vendors' datasheets (SXM parts), FLOP/s.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
    "L4": 121e12, "A10": 125e12, "V100": 125e12, "RTX 4090": 165e12, "B200": 2250e12,
}


def train_flops_per_image(model: torch.nn.Module, img_size: int, in_chans: int, device) -> float:
    imgs = torch.randn(2, in_chans, img_size, img_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(imgs)
    return 3 * counter.get_total_flops() / imgs.shape[0]


def measured_matmul_peak(device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul (up to 2048, sized down for a dtype the device emulates), the best of five
    trials after warm-up: the ceiling a CPU reaches, where no datasheet figure applies."""
    return matmul_rate(device, dtype, min_seconds=0.02, max_size=2048, trials=5)


def _tensor_core_peak(device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def device_peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of `precision` as it runs (bf16 | fp16 | no): the override, else the GPU's datasheet figure
    (fp32 in TF32: half the bf16 one on these parts; plain fp32: none, MFU left out), else (CPU) the measured
    matmul peak of that dtype."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        peak = _tensor_core_peak(device)
        if precision in ("bf16", "fp16"):
            return peak
        return peak / 2 if peak and torch.backends.cuda.matmul.allow_tf32 else None
    if device.type == "cpu":
        return measured_matmul_peak(device, PRECISION_DTYPES["bf16" if precision == "bf16" else "fp32"])
    return None


class Utilisation:
    """Model FLOPs utilisation: achieved FLOP/s over the peak. A figure above 1 is impossible: it means the peak was
    measured low (the machine busy with other work at the time). The peak is then measured again, the higher kept,
    and a figure still above 1 is left out (None), never reported.

        mfu = Utilisation(lambda: device_peak_flops(device, precision), remeasure=device.type == "cpu")
        mfu(flops_per_s)  # a fraction in (0, 1], or None
    """

    def __init__(self, measure_peak: Callable[[], float | None], remeasure: bool = True):
        self.measure_peak, self.remeasure = measure_peak, remeasure
        self.peak = measure_peak()

    def __call__(self, flops_per_s: float) -> float | None:
        if not self.peak:
            return None
        if flops_per_s > self.peak and self.remeasure:
            self.peak = max(self.peak, self.measure_peak() or 0.0)
        return flops_per_s / self.peak if flops_per_s <= self.peak else None
