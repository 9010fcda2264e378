"""How a run uses the machine it lands on, decided in one place for every stage (pretraining, fine-tuning,
linear probe, kNN, bench): CPU threads and processes, the mixed precision and torch.compile that `auto`
resolves to, TF32 on GPUs, the attention kernel.

`auto` decides from the hardware as measured, not from its name or a list of CPU flags:
- precision: a GPU gets bf16 where it has it, else fp16 with accelerate's grad scaler; a CPU gets bf16 autocast
  only where a short matmul probe finds bf16 clearly faster than fp32 (CPUs without bf16 units emulate it, tens
  of times slower than fp32: README, "Performance"), else fp32;
- compile: GPUs compile; a CPU run compiles only where a trial on its own first steps shows a gain, and only
  tries when the run is long enough to repay the compile time (`CompileTrial`).
Each decision comes with its reason, which the run prints first and saves in its config (`resolved.*`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable

import torch

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 autocast adds a cast of every activation and weight: a smaller matmul gain does not repay them.
BF16_MIN_GAIN = 1.5


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a setting resolved to on this machine, and why (one line, printed and saved with the run)."""
    value: Any  # mixed precision: "bf16" | "fp16" | "no"; compile: True | False | "auto" (a trial decides)
    reason: str
    warning: str | None = None  # an explicit choice that runs much slower here than the alternative


# ---- processes and threads ----

def cpu_ddp() -> bool:
    """Launched as several processes on a machine without GPUs: accelerate sets up gloo DDP only if told cpu=True."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (accelerate launch --use_fsdp, or an `accelerate config` with FSDP): known
    from the environment before any Accelerator exists (accelerate's PartialState does not record it)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_no_fsdp_on_cpu(device: torch.device) -> None:
    """Refuse an FSDP launch on CPUs: accelerate turns FSDP on only for accelerator devices, so the run would
    silently be plain DDP."""
    if device.type == "cpu" and fsdp_requested():
        from mpp.config import ConfigError
        raise ConfigError("FSDP was asked for (accelerate launch --use_fsdp or an FSDP `accelerate config`), but "
                          "accelerate runs FSDP on GPUs only and would train this CPU run with plain DDP: launch "
                          "without FSDP here")


def set_cpu_threads(cfg, device: torch.device) -> None:
    """Use this machine's cores on a CPU run. `accelerate launch` sets OMP_NUM_THREADS=1 unless given
    --cpu, which halved the quickstart's speed on a 2-core machine (README, "Performance").
    `cfg.train.cpu_threads` (training runs) or `cfg.cpu_threads` (evaluation configs) overrides."""
    if device.type == "cpu":
        threads = cfg.train.cpu_threads if hasattr(cfg, "train") else getattr(cfg, "cpu_threads", None)
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // processes_here))


def agree(decisions: list[Decision]) -> list[Decision]:
    """Process 0's decisions on every process (a probe on a busy machine may measure differently per process)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    if PartialState().num_processes > 1:
        broadcast_object_list(decisions)
    return decisions


# ---- matmul rates ----

def _matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    start = time.perf_counter()
    a @ b
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - start


def matmul_rate(device, dtype: torch.dtype, min_seconds: float = 1e-3, max_size: int = 1024, trials: int = 3) -> float:
    """FLOP/s of a square matmul in `dtype`: the size doubles from 256 until one product takes `min_seconds` (or
    reaches `max_size`), so an emulated dtype is timed on a small matrix and a fast one on a large one; then the
    best of `trials` at that size (other work on the machine only ever slows a trial down). Each size's first
    product is not timed: it sets up the kernel. Below 256 the call overheads hide a bf16 unit's gain."""
    size = 256
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        _matmul_seconds(a, b)
        if _matmul_seconds(a, b) >= min_seconds or size >= max_size:
            break
        size *= 2
    best = min(_matmul_seconds(a, b) for _ in range(trials))
    return 2 * size ** 3 / best


@functools.cache
def _cpu_rates(threads: int) -> dict[str, float]:
    return {name: matmul_rate(torch.device("cpu"), PRECISION_DTYPES[name]) for name in ("fp32", "bf16")}


def cpu_matmul_rates() -> dict[str, float]:
    """This CPU's fp32 and bf16 matmul FLOP/s at the current thread count, {"fp32": ..., "bf16": ...}: a probe of
    milliseconds, measured once per process."""
    return _cpu_rates(torch.get_num_threads())


# ---- mixed precision ----

def has_bf16_units(cpu_rates: dict[str, float]) -> bool:
    """Whether a CPU's bf16 matmuls are clearly faster than its fp32 ones (see BF16_MIN_GAIN)."""
    return cpu_rates["bf16"] >= BF16_MIN_GAIN * cpu_rates["fp32"]


def _gflops(rate: float) -> str:
    return f"{rate / 1e9:.2g}" if rate < 10e9 else f"{rate / 1e9:.0f}"


def choose_precision(asked: str, device_type: str, *, key: str = "train.mixed_precision", cuda_bf16: bool = False,
                     device_name: str = "", cpu_rates: dict[str, float] | None = None) -> Decision:
    """The precision a run uses, from the facts about its device: `asked` (auto | bf16 | fp16 | no) is only ever
    replaced when it is auto. `cpu_rates` ({"fp32", "bf16"} FLOP/s) are needed on a CPU for auto and bf16."""
    if asked not in ("auto", "bf16", "fp16", "no"):
        raise ValueError(f"{key}={asked!r}: choose auto, bf16, fp16 or no")
    if device_type == "cuda":
        if asked != "auto":
            return Decision(asked, f"{asked} (as set)")
        if cuda_bf16:
            return Decision("bf16", f"auto → bf16 ({device_name} has bf16)")
        return Decision("fp16", f"auto → fp16 with a grad scaler ({device_name} has no bf16)")
    if asked == "fp16" and device_type == "cpu":
        return Decision("fp16", "fp16 (as set; accelerate runs fp32 on a CPU)")
    if device_type != "cpu" or asked == "no":
        return Decision("no", f"auto → no (no rule for {device_type} devices)") if asked == "auto" else \
            Decision(asked, f"{asked} (as set)")
    fp32, bf16 = cpu_rates["fp32"], cpu_rates["bf16"]
    measured = f"bf16 matmul {_gflops(bf16)} GFLOP/s vs fp32 {_gflops(fp32)} on this CPU"
    if asked == "auto":
        pick = "bf16" if has_bf16_units(cpu_rates) else "no"
        return Decision(pick, f"auto → {pick} ({measured})")
    warning = None
    if bf16 < fp32:
        warning = (f"{key}=bf16 on a CPU without bf16 units: its bf16 matmuls run {fp32 / bf16:.0f}x slower than "
                   f"fp32 ({measured}), so this run will be many times slower than in fp32; {key}=auto (or no) "
                   f"runs fp32")
    return Decision("bf16", f"bf16 (as set; {measured})", warning)


def resolve_precision(asked: str, device: torch.device, key: str = "train.mixed_precision") -> Decision:
    """choose_precision with this process's facts: the GPU's bf16 support, or the CPU's measured matmul rates
    (run it after set_cpu_threads: the probe measures at the run's thread count)."""
    if device.type == "cuda":
        return choose_precision(asked, "cuda", key=key, cuda_bf16=torch.cuda.is_bf16_supported(),
                                device_name=torch.cuda.get_device_name(device))
    rates = cpu_matmul_rates() if device.type == "cpu" and asked in ("auto", "bf16") else None
    return choose_precision(asked, device.type, key=key, cpu_rates=rates)


def enable_tf32(device: torch.device) -> bool:
    """fp32 matmuls and convolutions in TF32 on GPUs that have it (Ampere and later): the fp32 parts of a
    mixed-precision run, and whole fp32 runs, at tensor-core speed. Returns whether it is on."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def resolve_settings(cfg, state, say: Callable[[str], None] | None = None) -> list[Decision]:
    """Resolve a run config's mixed precision (and, for training runs, compile) on this machine, in place: each
    value into its key, its reason into cfg.resolved; said first thing (process 0's decisions on every process;
    a slow explicit choice adds one warning). Also sets this process's CPU threads, at which the probe measures.
    `state`: accelerate's PartialState of the run; `say`: where the lines go (default: state.print)."""
    say = say or state.print
    device = state.device
    set_cpu_threads(cfg, device)
    train = getattr(cfg, "train", None)
    section, prefix = (train, "train.") if train is not None else (cfg, "")
    decisions = [resolve_precision(section.mixed_precision, device, prefix + "mixed_precision")]
    if train is not None:
        decisions.append(choose_compile(train.compile, device.type))
    decisions = agree(decisions)
    precision = decisions[0]
    tf32 = enable_tf32(device)
    section.mixed_precision = precision.value
    cfg.resolved.mixed_precision = precision.reason + ("; fp32 matmuls in TF32" if tf32 else "")
    say(f"{prefix}mixed_precision: {cfg.resolved.mixed_precision}")
    if train is not None:
        train.compile, cfg.resolved.compile = decisions[1].value, decisions[1].reason
        say(f"train.compile: {cfg.resolved.compile}")
    for decision in decisions:
        if decision.warning:
            say(f"warning: {decision.warning}")
    return decisions


def effective_precision(accelerator) -> str:
    """What the matmuls really run in: accelerate runs fp32 when fp16 is asked for on a CPU."""
    if accelerator.mixed_precision in ("fp16", "bf16") and not accelerator.native_amp:
        return "no"
    return accelerator.mixed_precision


def precision_note(accelerator, asked: str, key: str = "train.mixed_precision") -> str | None:
    """A line saying that the precision asked for is not what runs, or None."""
    if effective_precision(accelerator) != asked:
        return (f"{key}={asked} is not available on {accelerator.device.type}; running fp32 "
                f"(on CPUs, bf16 is the mixed precision)")
    return None


def fused_attn(cfg, device: torch.device) -> bool:
    """train.fused_attn, or its default: torch's fused attention kernel, except for bf16 on a CPU with bf16 units,
    where the kernel's bf16 backward is slow and timm's explicit q@k, softmax, @v path trains 1.8x faster; in fp32,
    and in bf16 that the CPU emulates, the fused kernel is the faster (README, "Performance"). Call it once the
    precision is resolved."""
    if cfg.train.fused_attn is not None:
        return cfg.train.fused_attn
    return not (device.type == "cpu" and cfg.train.mixed_precision == "bf16" and has_bf16_units(cpu_matmul_rates()))


# ---- torch.compile ----

def choose_compile(asked, device_type: str, key: str = "train.compile") -> Decision:
    """True / False as set; auto: compiled on GPUs, and on CPUs left to a CompileTrial of the run's first steps."""
    if asked is True or asked is False:
        return Decision(asked, f"{'yes' if asked else 'no'} (as set)")
    if asked != "auto":
        raise ValueError(f"{key}={asked!r}: choose auto, true or false")
    if device_type == "cuda":
        return Decision(True, "auto → yes (GPU)")
    return Decision("auto", "auto: decided from the run's first steps, where the run is long enough to repay "
                            "compiling")


def dynamo_backend(cfg) -> str | None:
    """torch.compile's backend for the accelerator: only a compile decided before the run starts (True)."""
    return "inductor" if cfg.train.compile is True else None


class CompileTrial:
    """train.compile=auto on a CPU: compile where it pays, decided from the run's own first steps, each a training
    step, so that the trial costs nothing where compiling cannot pay and only the compile time where it could.

    The first `warmup` steps run eager, untimed; the next `timed` ones are timed. If the rest of the run at that pace
    is too short for a compile (~`compile_guess_s`) to be under `max_share` of it, the run stays eager. Else the
    model is compiled (its first call compiles, and a second settles), then eager and compiled steps alternate for
    `pairs` pairs, so that the host's drift hits both alike, and the compiled model is kept if its median step is
    the faster. Timings are averaged over processes (`mean`), so every DDP process decides alike.

        trial = CompileTrial(model, remaining_steps, mean)
        step_model = trial.model()        # before each step
        decision = trial.record(seconds)  # after it; a Decision once made (then trial.model() is the one kept)
    """

    def __init__(self, model, remaining_steps: int, mean: Callable[[list[float]], list[float]],
                 compile_fn: Callable = functools.partial(torch.compile, backend="inductor"),
                 compile_guess_s: float = 60.0, max_share: float = 0.1, warmup: int = 2, timed: int = 3,
                 pairs: int = 3):
        self.eager, self.compiled, self.kept = model, None, None
        self.remaining, self.mean, self.compile_fn = remaining_steps, mean, compile_fn
        self.guess, self.share, self.warmup, self.timed, self.pairs = compile_guess_s, max_share, warmup, timed, pairs
        self.steps, self.eager_times, self.compiled_times, self.compile_seconds = 0, [], [], 0.0
        self.decision: Decision | None = None
        if remaining_steps < self._trial_start + 2 + 2 * pairs:
            self._decide(False, "the run is too short to try")

    @property
    def _trial_start(self) -> int:  # the step that compiles
        return self.warmup + self.timed

    def model(self):
        """The model for the next step."""
        if self.kept is not None:
            return self.kept
        i = self.steps - self._trial_start
        if i < 0 or (i >= 2 and (i - 2) % 2 == 0):
            return self.eager
        return self.compiled

    def record(self, seconds: float) -> Decision | None:
        """The time of the step just run (on every process); the decision, at the step that makes it."""
        if self.decision is not None:
            return None
        i, self.steps = self.steps, self.steps + 1
        if self.warmup <= i < self._trial_start:
            self.eager_times.append(seconds)
        if i == self._trial_start - 1:
            return self._after_eager()
        j = i - self._trial_start
        if j == 0:
            self.compile_seconds = seconds
        elif j >= 2:
            (self.eager_times if j % 2 == 0 else self.compiled_times).append(seconds)
            if len(self.compiled_times) == self.pairs:
                return self._after_pairs()
        return None

    def _decide(self, value: bool, reason: str) -> Decision:
        self.kept = self.compiled if value else self.eager
        self.decision = Decision(value, f"auto → {'yes' if value else 'no'} ({reason})")
        return self.decision

    def _after_eager(self) -> Decision | None:
        (step_s,) = self.mean([statistics.median(self.eager_times)])
        rest = self.remaining - self._trial_start
        if self.share * step_s * rest < self.guess:
            return self._decide(False, f"the rest of the run, ~{step_s * rest:.0f} s eager, is too short to repay "
                                       f"~{self.guess:.0f} s of compiling")
        self.eager_times = []
        self.compiled = self.compile_fn(self.eager)
        return None

    def _after_pairs(self) -> Decision:
        compile_s, eager_s, compiled_s = self.mean([self.compile_seconds, statistics.median(self.eager_times),
                                                    statistics.median(self.compiled_times)])
        measured = (f"compiled steps {compiled_s:.3g} s vs eager {eager_s:.3g} s, {eager_s / compiled_s:.2f}x; "
                    f"compiling took {compile_s:.0f} s")
        return self._decide(compiled_s < eager_s, measured)
