"""Exact resume: a run stopped (SIGTERM) or killed (-9) at a random step and resumed ends bit-identical to
the uninterrupted run, on the CPU in fp32, mid-epoch and across an epoch boundary; metrics.jsonl holds every
step once. (Two DDP processes: tests/test_pretrain.py.)"""
from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import (QUICKSTART, REPO, checkpoint_steps, pretrain_command, quick_config, read_metrics, run_train,
                      small_overrides, start_pretrain, subprocess_env, wait_for)
from eval_subset import fresh_accelerate_state  # noqa: F401 (an autouse fixture: these runs are fp32)

STEPS = 36
# The sample's 1,000 val images: 31 steps of 32 an epoch, so the runs below cross an epoch boundary.
EXACT = [f"train.steps={STEPS}", "train.warmup_steps=4", "train.mixed_precision=no", "data.split=val",
         "log.every=1", "log.image_every=1000", "checkpoint.every=1000"]
STEPS_PER_EPOCH = 1000 // 32


def final_state(out) -> tuple[dict, dict]:
    """(model tensors, optimizer state) of a run's newest checkpoint."""
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(ckpt / "model.safetensors"), torch.load(ckpt / "optimizer.bin", weights_only=True)


def assert_bit_identical(out, reference, why: str) -> None:
    (model, optim), (ref_model, ref_optim) = final_state(out), reference["state"]
    assert set(model) == set(ref_model)
    differing = [k for k in ref_model if not torch.equal(model[k], ref_model[k])]
    assert not differing, f"{why}: {len(differing)} of {len(ref_model)} tensors differ, e.g. {differing[:3]}"
    for index, saved in ref_optim["state"].items():
        for name, value in saved.items():
            assert torch.equal(optim["state"][index][name], value), (why, index, name)
    # Every step logged once, with the uninterrupted run's loss to the last bit.
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == reference["losses"], why


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from accelerate.state import AcceleratorState
    out = tmp_path_factory.mktemp("uninterrupted")
    AcceleratorState._reset_state(True)  # set up before the autouse fixture resets it for each test
    run_train(quick_config(out, *EXACT))
    AcceleratorState._reset_state(True)
    losses = [(r["step"], r["loss"]) for r in read_metrics(out)]
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    return {"state": final_state(out), "losses": losses, "out": out}


def stop_after_step(monkeypatch, step: int) -> None:
    """SIGTERM this process right after its `step`-th optimizer step: the run checkpoints the next and stops."""
    import mpp.engine
    real, calls = mpp.engine.train_step, []

    def stepping(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(mpp.engine, "train_step", stepping)


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_stopped_and_resumed_run_ends_bit_identical(uninterrupted, tmp_path, monkeypatch, where):
    # mid-epoch: a random step of the first epoch; epoch end: the stop lands on the epoch's last step, and the
    # resumed run starts the next epoch.
    stop = random.randrange(2, STEPS_PER_EPOCH - 3) if where == "mid-epoch" else STEPS_PER_EPOCH - 1
    stop_after_step(monkeypatch, stop)
    assert run_train(quick_config(tmp_path, *EXACT)) is not None
    assert checkpoint_steps(tmp_path) == [stop + 1], f"stopped after step {stop}"
    monkeypatch.undo()
    run_train(quick_config(tmp_path, *EXACT, "resume=auto"))
    assert checkpoint_steps(tmp_path)[-1] == STEPS
    assert_bit_identical(tmp_path, uninterrupted, f"stopped at step {stop + 1}")


def test_killed_run_resumes_bit_identical_and_logs_each_step_once(uninterrupted, tmp_path):
    # data.train: the recipe's own repo-relative path (the run's cwd is the repo root); the same shards as the
    # uninterrupted run's absolute path, so the same run.
    args = [QUICKSTART, *small_overrides(tmp_path, *EXACT, "checkpoint.every=5", "resume=auto",
                                         "data.train=mpp/sample_data/cifar10")]
    first_log = tmp_path / "first.log"
    proc = start_pretrain(first_log, *args)
    kill_after = random.choice([5, 10, 15, 20, 25])  # the newest checkpoint when the kill lands (or a later one)

    def checkpointed_and_logged_past_it():
        steps = checkpoint_steps(tmp_path)
        logged = [r["step"] for r in read_metrics(tmp_path)]
        return steps and steps[-1] >= kill_after and logged and logged[-1] > steps[-1]
    try:
        wait_for(checkpointed_and_logged_past_it, proc, 240, f"a checkpoint at step {kill_after} and a step past it",
                 first_log)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_at = checkpoint_steps(tmp_path)[-1]
    logged = [r["step"] for r in read_metrics(tmp_path)]
    assert logged[-1] > resumed_at  # steps the resumed run does again were logged by the killed one

    second = subprocess.run(pretrain_command(*args), cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{resumed_at:08d}'} at step {resumed_at}" in output
    assert checkpoint_steps(tmp_path)[-1] == STEPS and len(checkpoint_steps(tmp_path)) <= 2  # keep 2
    assert_bit_identical(tmp_path, uninterrupted, f"killed after the checkpoint of step {resumed_at}")
