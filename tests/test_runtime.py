"""What `auto` resolves to on each kind of machine (mpp/runtime.py), with the hardware's facts given; that a
run's autocast runs what was resolved and says why; the compile trial's decisions; MFU never above 1."""
from __future__ import annotations

import functools
import re

import pytest
import torch
import yaml

from conftest import QUICKSTART, quick_config, read_metrics, run_train
from eval_subset import fresh_accelerate_state  # noqa: F401 (autouse: each run makes its own Accelerator)
from mpp import runtime
from mpp.config import PretrainConfig
from mpp.flops import Utilisation
from mpp.recipe import ConfigError, load_config
from mpp.runtime import CompileTrial, choose_compile, choose_precision

# Matmul rates (FLOP/s) of the CPUs measured for README: AMX (bf16 units), and AVX2 only (bf16 emulated).
AMX = {"fp32": 340e9, "bf16": 1350e9}
AVX2 = {"fp32": 87e9, "bf16": 0.93e9}


# ---- mixed precision ----

@pytest.mark.parametrize("device, facts, expected", [
    ("cuda", dict(cuda_bf16=True, device_name="NVIDIA H100"), "bf16"),
    ("cuda", dict(cuda_bf16=False, device_name="Tesla V100"), "fp16"),
    ("cpu", dict(cpu_rates=AMX), "bf16"),
    ("cpu", dict(cpu_rates=AVX2), "no"),
    ("cpu", dict(cpu_rates={"fp32": 100e9, "bf16": 140e9}), "no"),  # faster, but not enough to repay the casts
    ("mps", {}, "no"),
])
def test_auto_precision_follows_the_hardware(device, facts, expected):
    decision = choose_precision("auto", device, **facts)
    assert decision.value == expected
    assert decision.reason.startswith(f"auto → {expected}") and decision.warning is None


def test_auto_on_a_cpu_says_what_it_measured():
    assert choose_precision("auto", "cpu", cpu_rates=AVX2).reason == \
        "auto → no (bf16 matmul 0.93 GFLOP/s vs fp32 87 on this CPU)"
    assert choose_precision("auto", "cpu", cpu_rates=AMX).reason == \
        "auto → bf16 (bf16 matmul 1350 GFLOP/s vs fp32 340 on this CPU)"


@pytest.mark.parametrize("asked", ["bf16", "fp16", "no"])
@pytest.mark.parametrize("device, facts", [("cuda", dict(cuda_bf16=True)), ("cuda", dict(cuda_bf16=False)),
                                           ("cpu", dict(cpu_rates=AMX)), ("cpu", dict(cpu_rates=AVX2))])
def test_an_explicit_precision_is_never_overridden(asked, device, facts):
    assert choose_precision(asked, device, **facts).value == asked


def test_explicit_bf16_on_a_cpu_that_emulates_it_runs_with_one_warning():
    slow = choose_precision("bf16", "cpu", cpu_rates=AVX2, key="mixed_precision")
    assert slow.value == "bf16"
    assert "94x slower" in slow.warning and "mixed_precision=auto (or no) runs fp32" in slow.warning
    assert choose_precision("bf16", "cpu", cpu_rates=AMX).warning is None


def test_the_cpu_probe_runs_once_per_process_and_only_when_needed(monkeypatch):
    calls = []

    def fake_rate(device, dtype, **kwargs):
        calls.append(dtype)
        return {torch.float32: 87e9, torch.bfloat16: 0.93e9}[dtype]
    monkeypatch.setattr(runtime, "matmul_rate", fake_rate)
    runtime._cpu_rates.cache_clear()
    try:
        assert runtime.resolve_precision("no", torch.device("cpu")).value == "no" and calls == []
        for _ in range(3):
            assert runtime.resolve_precision("auto", torch.device("cpu")).value == "no"
        assert sorted(calls, key=str) == [torch.bfloat16, torch.float32]  # one probe of each dtype
    finally:
        runtime._cpu_rates.cache_clear()


def test_matmul_rate_measures_a_real_product():
    rate = runtime.matmul_rate(torch.device("cpu"), torch.float32, min_seconds=1e-4, max_size=256)
    assert 1e8 < rate < 1e14  # FLOP/s of a 256^2 product: a CPU core does ~1e9 to ~1e11


@pytest.mark.parametrize("device, precision, rates, fused", [
    ("cuda", "bf16", None, True), ("cpu", "no", AMX, True), ("cpu", "bf16", AMX, False), ("cpu", "bf16", AVX2, True)])
def test_the_attention_kernel_is_the_faster_one_for_the_precision_run(device, precision, rates, fused, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_matmul_rates", lambda: rates)
    cfg = load_config(PretrainConfig, QUICKSTART, [f"train.mixed_precision={precision}"])
    assert runtime.fused_attn(cfg, torch.device(device)) is fused
    cfg.train.fused_attn = not fused
    assert runtime.fused_attn(cfg, torch.device(device)) is not fused  # as set


# ---- a run resolves, says, saves and runs it ----

def autocast_spy(monkeypatch) -> list:
    """The dtype of the first Linear's output in every forward of the run's model: what its matmuls ran in."""
    from mpp import pretrain
    seen, original = [], pretrain.pretrain_loss

    def spying_loss(model, imgs):
        if not getattr(model, "_spied", False):
            linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
            model._spied = True
        return original(model, imgs)
    monkeypatch.setattr(pretrain, "pretrain_loss", spying_loss)
    return seen


@pytest.mark.parametrize("rates, expected, dtype", [(AMX, "bf16", torch.bfloat16), (AVX2, "no", torch.float32)])
def test_a_run_runs_the_precision_it_resolved_and_saves_why(rates, expected, dtype, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "cpu_matmul_rates", lambda: rates)
    # The device peak is first measured low (the machine busy), then right: MFU is re-measured, never above 1.
    peaks = iter([1e6, 1e15])
    monkeypatch.setattr("mpp.engine.device_peak_flops", lambda *args: next(peaks))
    seen = autocast_spy(monkeypatch)
    cfg = quick_config(tmp_path, "train.steps=3", "train.batch_size=16", "train.micro_batch_size=16", "log.every=1",
                       "log.peak_tflops=null")
    run_train(cfg)
    assert seen and set(seen) == {dtype}
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == expected
    assert saved["resolved"]["mixed_precision"] == choose_precision("auto", "cpu", cpu_rates=rates).reason
    assert saved["train"]["compile"] is False and saved["resolved"]["compile"] == "auto → no (the run is too short to try)"
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == cfg  # a saved config loads back as a recipe
    first = capsys.readouterr().out.splitlines()[:2]
    assert first == [f"train.mixed_precision: {saved['resolved']['mixed_precision']}",
                     f"train.compile: {choose_compile('auto', 'cpu').reason}"]
    mfu = [r["mfu"] for r in read_metrics(tmp_path)]
    assert len(mfu) == 3 and all(0 < m <= 1 for m in mfu)


def test_mfu_is_left_out_when_the_peak_stays_below_the_achieved_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mpp.engine.device_peak_flops", lambda *args: 1e6)  # every measurement under load
    cfg = quick_config(tmp_path, "train.steps=2", "train.batch_size=16", "train.micro_batch_size=16", "log.every=1",
                       "log.peak_tflops=null", "train.mixed_precision=no")
    run_train(cfg)
    records = read_metrics(tmp_path)
    assert len(records) == 2 and not [r for r in records if "mfu" in r]
    assert capsys.readouterr().out.count("note: mfu left out") == 1


def test_utilisation_re_measures_a_peak_measured_under_load():
    peaks = iter([50.0, 200.0])
    mfu = Utilisation(lambda: next(peaks))
    assert mfu(100.0) == 0.5 and mfu.peak == 200.0
    assert mfu(150.0) == 0.75  # the better peak is kept
    always_low = Utilisation(lambda: 50.0)
    assert always_low(40.0) == 0.8 and always_low(100.0) is None
    datasheet = Utilisation(lambda: 50.0, remeasure=False)
    assert datasheet(100.0) is None and datasheet(25.0) == 0.5
    assert Utilisation(lambda: None)(100.0) is None


# ---- torch.compile ----

def test_compile_auto_is_yes_on_gpus_a_trial_on_cpus_and_never_overrides_a_choice():
    assert choose_compile("auto", "cuda").value is True
    assert choose_compile("auto", "cpu").value == "auto"
    for device in ("cpu", "cuda"):
        assert choose_compile(True, device).value is True and choose_compile(False, device).value is False


def drive(trial: CompileTrial, eager_s: float, compiled_s: float, compile_s: float = 5.0) -> list[str]:
    """Run the trial to its decision with these step times; the model it handed out at each step."""
    used = []
    while trial.decision is None:
        model = trial.model()
        used.append("compiled" if model is trial.compiled else "eager")
        j = trial.steps - trial._trial_start
        trial.record(compile_s if j == 0 else (compiled_s if model is trial.compiled else eager_s))
    return used


def same(values):
    return values


def test_compile_trial_keeps_the_compiled_model_where_its_steps_are_faster():
    compiled_calls = []
    trial = CompileTrial("eager model", 10_000, same, compile_fn=lambda m: compiled_calls.append(m) or "compiled")
    used = drive(trial, eager_s=1.0, compiled_s=0.8)
    assert used == ["eager"] * 5 + ["compiled"] * 2 + ["eager", "compiled"] * 3
    assert compiled_calls == ["eager model"] and trial.model() == "compiled" and trial.decision.value is True
    assert trial.decision.reason == "auto → yes (compiled steps 0.8 s vs eager 1 s, 1.25x; compiling took 5 s)"


def test_compile_trial_returns_to_eager_where_compiling_gives_nothing():
    trial = CompileTrial("eager model", 10_000, same, compile_fn=lambda m: "compiled")
    drive(trial, eager_s=1.0, compiled_s=1.1)
    assert trial.decision.value is False and trial.model() == "eager model"


@pytest.mark.parametrize("steps, step_s", [(12, 100.0), (5000, 0.1)])  # too few steps; too little time (500 s)
def test_compile_trial_does_not_compile_a_run_too_short_to_repay_it(steps, step_s):
    compiled_calls = []
    trial = CompileTrial("eager model", steps, same, compile_fn=compiled_calls.append)
    used = drive(trial, eager_s=step_s, compiled_s=step_s / 2)
    assert compiled_calls == [] and set(used) <= {"eager"} and trial.decision.value is False


def test_compile_trial_decides_on_the_mean_over_processes():
    # This process measures a gain; the mean over processes (what every process decides on) shows none.
    others = iter([[1.0], [5.0, 1.0, 1.2]])
    trial = CompileTrial("eager model", 10_000, lambda values: next(others), compile_fn=lambda m: "compiled")
    drive(trial, eager_s=1.0, compiled_s=0.5)
    assert trial.decision.value is False


def test_a_run_with_compile_auto_records_the_trials_decision(tmp_path, monkeypatch, capsys):
    # A trial in a real run; compiling itself (a minute on a CPU) is left out: torch.compile's stand-in wraps the model.
    wrapped = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            wrapped.append(model)

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    monkeypatch.setattr("mpp.engine.CompileTrial", functools.partial(CompileTrial, compile_fn=Compiled,
                                                                     compile_guess_s=0.0))
    cfg = quick_config(tmp_path, "train.steps=16", "train.batch_size=16", "train.micro_batch_size=16",
                       "train.mixed_precision=no")
    run_train(cfg)
    assert len(wrapped) == 1
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["compile"] in (True, False) and saved["train"]["compile"] == cfg.train.compile
    assert re.fullmatch(r"auto → (yes|no) \(compiled steps .* s vs eager .* s, .*x; compiling took .* s\)",
                        saved["resolved"]["compile"])
    assert f"train.compile: {saved['resolved']['compile']}" in capsys.readouterr().out


# ---- the bench ----

def test_bench_train_reports_the_precision_it_ran_and_its_yardstick(monkeypatch):
    from mpp.bench import bench_train
    monkeypatch.setattr(runtime, "cpu_matmul_rates", lambda: AVX2)
    cfg = load_config(PretrainConfig, QUICKSTART, ["train.batch_size=8", "train.micro_batch_size=8"])
    result = bench_train(cfg, steps=1, warmup=1, rounds=2, baseline=True)
    assert result["mixed_precision"] == "no" and result["precision_reason"].startswith("auto → no")
    assert result["compile"] is False
    assert len(result["img_per_s_rounds"]) == len(result["plain_img_per_s_rounds"]) == 2
    assert result["mpp_over_plain"] == pytest.approx(result["img_per_s"] / result["plain_img_per_s"])
    assert result["mfu"] is None or 0 < result["mfu"] <= 1


def test_an_fsdp_launch_on_cpus_is_refused_before_the_run(tmp_path, monkeypatch):
    # accelerate launch --use_fsdp sets ACCELERATE_USE_FSDP; on CPUs accelerate would train with plain DDP instead.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_train(quick_config(out))
    message = str(err.value)
    assert "\n" not in message and "FSDP" in message and "plain DDP" in message
    assert not out.exists()


@pytest.mark.parametrize("value, fsdp", [("true", True), ("1", True), ("false", False), (None, False)])
def test_an_fsdp_launch_is_known_before_the_accelerator_and_its_checkpoints_hold_no_model_file(value, fsdp,
                                                                                               monkeypatch):
    from mpp.engine import Trainer
    if value is None:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
    assert runtime.fsdp_requested() is fsdp
    trainer = Trainer.__new__(Trainer)  # the property reads the launch, not the trainer's state
    assert Trainer._model_file.fget(trainer) is (not fsdp)
