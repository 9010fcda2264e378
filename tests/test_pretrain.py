"""Pretraining end to end on the shipped CIFAR-10 shards, on the CPU: the loss falls, runs write what
they promise, checkpoints resume after a kill or a SIGTERM, non-finite losses stop a run without
touching its weights, and two DDP processes stay in lockstep."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import (QUICKSTART, REPO, checkpoint_steps, launch_two_nodes, pretrain_command, quick_config,
                      read_metrics, run_train, small_overrides, start_pretrain, subprocess_env, wait_for)
from mpp.config import PretrainConfig
from mpp.recipe import ConfigError, load_config, to_dict

E2E_STEPS = 60


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """One in-process run shared by the tests below: 60 steps of 64 images, ViT-Tiny/4."""
    out = tmp_path_factory.mktemp("e2e")
    cfg = quick_config(out, f"train.steps={E2E_STEPS}", "train.batch_size=64", "train.micro_batch_size=64",
                       "log.every=10", "log.image_every=1000", "checkpoint.every=20", "checkpoint.keep=2")
    model = run_train(cfg)
    return cfg, model, out


def state_of(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved_state(ckpt) -> dict:
    """mpp's plain-data state in a checkpoint: {"run": ..., "loader": ...}."""
    return json.loads((ckpt / "state.json").read_text())


def run_state(ckpt) -> dict:
    """The run's position (step, skipped steps), without the lr schedule kept beside it for the record."""
    return {k: v for k, v in saved_state(ckpt)["run"].items() if k != "lr_schedule"}


# ---- 5. the loss falls, and the run writes its outputs ----

def test_loss_falls_on_real_images(e2e_run):
    cfg, _, out = e2e_run
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(10, E2E_STEPS + 1, 10))
    losses = [r["loss"] for r in records]
    assert all(0 < loss < 10 for loss in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(r["bad_steps"] == 0 for r in records)
    assert not [k for r in records for k in r if k.startswith("loss_")]  # plain MAE: one term, logged as loss
    assert records[-1]["epoch"] == pytest.approx(E2E_STEPS / (5000 // 64))
    assert all(r["lr"] >= 0 for r in records) and records[-1]["lr"] > 0


def test_reconstruction_image_is_written(e2e_run):
    _, _, out = e2e_run
    images = sorted((out / "reconstructions").glob("*.png"))
    assert [p.name for p in images] == [f"step_{E2E_STEPS:08d}.png"]  # image_every > steps: only the final one
    with Image.open(images[0]) as img:
        img.verify()
    with Image.open(images[0]) as img:
        width, height = img.size
        pixels = torch.frombuffer(bytearray(img.convert("L").tobytes()), dtype=torch.uint8).float()
    # Four columns (original, masked, reconstruction, pasted) of 32 px images, one row per preview image.
    assert 4 * 32 <= width <= 4096 and 32 <= height <= 8192
    assert height > width  # 8 preview rows, 4 columns
    assert pixels.std() > 10  # an image, not a blank


def test_checkpoints_keep_the_newest(e2e_run):
    _, _, out = e2e_run
    assert checkpoint_steps(out) == [40, 60]  # every 20, keep 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000040", "step_00000060"]


def test_output_dir_holds_the_resolved_config(e2e_run):
    cfg, _, out = e2e_run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == to_dict(cfg)
    assert saved["train"]["steps"] == E2E_STEPS and saved["model"]["encoder"] == "tiny"
    assert saved["optim"]["weight_decay"] == 0.05  # inherited from base.yaml, written out resolved
    assert load_config(PretrainConfig, out / "config.yaml") == cfg


# ---- 9. checkpoint contents ----

def test_checkpoint_holds_model_optimizer_schedule_rng_and_config(e2e_run):
    cfg, model, out = e2e_run
    ckpt = out / "checkpoints" / f"step_{E2E_STEPS:08d}"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "config.yaml", "state.json"}

    # The weights are the model's at the end of the run.
    saved = load_file(ckpt / "model.safetensors")
    final = state_of(model)
    assert set(saved) == set(final)
    assert all(torch.equal(saved[k], final[k]) for k in final)

    # AdamW state for every trainable tensor, 60 updates each.
    optim = torch.load(ckpt / "optimizer.bin", weights_only=True)
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(optim["state"]) == trainable
    assert {float(s["step"]) for s in optim["state"].values()} == {float(E2E_STEPS)}
    assert {g["weight_decay"] for g in optim["param_groups"]} == {0.0, cfg.optim.weight_decay}

    # The run's own position and the lr schedule, as plain data.
    state = saved_state(ckpt)
    assert run_state(ckpt) == {"step": E2E_STEPS, "bad_steps": 0, "bad_samples": 0}
    # The loader's position: 60 steps of one 64-image micro-batch, 78 batches an epoch (5000 // 64).
    data = state["loader"]
    assert (data["epoch"], data["batches"]) == (0, E2E_STEPS) and data["batches_per_epoch"] == 5000 // 64
    schedule = state["run"]["lr_schedule"]
    assert schedule["t_initial"] + schedule["warmup_t"] == E2E_STEPS

    from accelerate.utils import load  # weights only, with the numpy types of the RNG states
    rng = load(ckpt / "random_states_0.pkl")
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(rng)

    assert yaml.safe_load((ckpt / "config.yaml").read_text()) == to_dict(cfg)


def test_fused_adamw_steps_as_the_per_tensor_loop():
    # engine.adamw asks torch for its fused kernel (one pass over all tensors); given the same gradients, over
    # timm's two parameter groups, it must move every weight as the plain per-tensor AdamW does.
    from mpp.engine import adamw
    from mpp.models import build_model
    cfg = load_config(PretrainConfig, QUICKSTART, [])
    torch.manual_seed(0)
    fused_model, loop_model = build_model(cfg.model), build_model(cfg.model)
    start = {k: v.clone() for k, v in fused_model.state_dict().items()}
    loop_model.load_state_dict(start)
    fused = adamw(fused_model, 1e-3, cfg.optim, torch.device("cpu"))
    loop = adamw(loop_model, 1e-3, cfg.optim, torch.device("cpu"))
    for group in loop.param_groups:
        group["fused"] = False
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [0.0, cfg.optim.weight_decay]
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p, q in zip(fused_model.parameters(), loop_model.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    a, b = fused_model.state_dict(), loop_model.state_dict()
    assert all(torch.equal(a[k], start[k]) != p.requires_grad for k, p in fused_model.named_parameters())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def copy_run(out, dest, config: bool = False):
    """The newest checkpoint (and optionally config.yaml) of run `out` in a fresh output_dir `dest`."""
    name = f"step_{E2E_STEPS:08d}"
    shutil.copytree(out / "checkpoints" / name, dest / "checkpoints" / name)
    if config:
        shutil.copy(out / "config.yaml", dest / "config.yaml")
    return dest / "checkpoints" / name


def test_resume_with_another_model_size_names_the_difference(e2e_run, tmp_path):
    _, _, out = e2e_run
    ckpt = copy_run(out, tmp_path)
    before = {p.name: file_digest(p) for p in ckpt.iterdir()}
    cfg = quick_config(tmp_path, "model.encoder=small", "resume=auto", f"train.steps={E2E_STEPS + 10}")
    with pytest.raises(ConfigError) as err:
        run_train(cfg)
    message = str(err.value)
    assert "model.encoder" in message and "'tiny'" in message and "'small'" in message
    assert ckpt.name in message
    assert "model.decoder" not in message  # only what differs
    assert checkpoint_steps(tmp_path) == [E2E_STEPS]
    assert {p.name: file_digest(p) for p in ckpt.iterdir()} == before
    assert read_metrics(tmp_path) == []


def test_refused_resume_leaves_the_runs_config_untouched(e2e_run, tmp_path):
    _, _, out = e2e_run
    copy_run(out, tmp_path, config=True)
    before = file_digest(tmp_path / "config.yaml")
    with pytest.raises(ConfigError):
        run_train(quick_config(tmp_path, "model.encoder=small", "resume=auto"))
    assert file_digest(tmp_path / "config.yaml") == before


def test_fresh_run_refuses_an_output_dir_holding_checkpoints(e2e_run, tmp_path):
    _, _, out = e2e_run
    ckpt = copy_run(out, tmp_path, config=True)
    before = {p.name: file_digest(p) for p in [*ckpt.iterdir(), tmp_path / "config.yaml"]}
    with pytest.raises(ConfigError) as err:
        run_train(quick_config(tmp_path, "resume=null"))
    assert "resume=auto" in str(err.value) and ckpt.name in str(err.value)
    assert {p.name: file_digest(p) for p in [*ckpt.iterdir(), tmp_path / "config.yaml"]} == before
    assert checkpoint_steps(tmp_path) == [E2E_STEPS] and read_metrics(tmp_path) == []


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    run_train(quick_config(tmp_path, "train.steps=4", "train.warmup_steps=1", "log.every=1"))
    run_train(quick_config(tmp_path, "train.steps=8", "train.warmup_steps=1", "log.every=1", "resume=auto"))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    extension = [r["lr"] for r in records[4:7]]  # steps 5-7 of a cosine decay to 0 at step 8
    assert all(lr > 0 for lr in extension), extension
    assert extension == sorted(extension, reverse=True)


# ---- 7. non-finite losses ----

@pytest.fixture
def good_then_nan(tmp_path, monkeypatch):
    """Two good steps (checkpoint at step 2), then a resumed run whose every loss is NaN.

    Returns (run the NaN part with extra overrides -> the NonFiniteLoss, the models the loss saw,
    the step-2 checkpoint folder, sha256 of its files).
    """
    from mpp.engine import NonFiniteLoss
    from mpp.models import MaskedImageModel

    run_train(quick_config(tmp_path, "train.steps=2", "checkpoint.every=2", "log.every=1"))
    assert checkpoint_steps(tmp_path) == [2]
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    digests = {p.name: file_digest(p) for p in ckpt.iterdir()}

    models = []
    real_forward = MaskedImageModel.forward

    def nan_forward(self, *args, **kwargs):  # a NaN loss, but still a graph: backward gives NaN gradients
        models.append(self)
        out = real_forward(self, *args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    def run_nan(*extra):
        monkeypatch.setattr(MaskedImageModel, "forward", nan_forward)
        cfg = quick_config(tmp_path, "train.steps=20", "log.every=1", "train.max_bad_steps=3", "resume=auto", *extra)
        with pytest.raises(NonFiniteLoss) as err:
            run_train(cfg)
        return err.value

    return run_nan, models, ckpt, digests


def test_non_finite_losses_stop_the_run_without_updating_weights(good_then_nan, tmp_path):
    run_nan, models, ckpt, digests = good_then_nan
    logged_before = len(read_metrics(tmp_path))
    err = run_nan("checkpoint.every=1000")
    assert re.search(r"\b3 steps\b", str(err)), str(err)

    # The model the bad steps ran on still holds exactly the checkpoint's weights: no update was applied.
    assert len({id(m) for m in models}) == 1
    saved = load_file(ckpt / "model.safetensors")
    current = state_of(models[-1])
    assert all(torch.isfinite(v).all() for v in current.values())
    assert set(saved) == set(current) and all(torch.equal(saved[k], current[k]) for k in saved)
    # Nothing was saved by the failed run, and the good checkpoint is intact.
    assert checkpoint_steps(tmp_path) == [2]
    assert {p.name: file_digest(p) for p in ckpt.iterdir()} == digests
    # Bad steps log no made-up loss, count themselves, and the third in a row (step 5) stops the run.
    new_records = read_metrics(tmp_path)[logged_before:]
    assert [(r["step"], r["bad_steps"]) for r in new_records] == [(3, 1), (4, 2)]
    assert all(r["loss"] != r["loss"] for r in new_records)  # NaN


def test_no_checkpoint_is_saved_on_a_non_finite_step(good_then_nan, tmp_path):
    run_nan, _, ckpt, digests = good_then_nan
    run_nan("checkpoint.every=1")
    assert checkpoint_steps(tmp_path) == [2]
    assert {p.name: file_digest(p) for p in ckpt.iterdir()} == digests


# ---- 6. SIGTERM (kill -9 and exact resume: tests/test_resume.py) ----

def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
    args = [QUICKSTART, *small_overrides(tmp_path, "train.steps=25", "checkpoint.every=1000", "log.every=1",
                                         "resume=auto")]
    first_log = tmp_path / "first.log"
    proc = start_pretrain(first_log, *args)
    try:
        wait_for(lambda: any(r["step"] >= 2 for r in read_metrics(tmp_path)), proc, 240, "step 2", first_log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    output = first_log.read_text()
    assert proc.returncode == 0, output[-3000:]
    stopped = checkpoint_steps(tmp_path)
    assert len(stopped) == 1, output[-3000:]
    stop_step = stopped[0]
    assert 2 <= stop_step < 25
    assert read_metrics(tmp_path)[-1]["step"] == stop_step  # the step it finished is the one it saved
    assert re.search(rf"stopped by signal at step {stop_step}\b", output), output[-3000:]
    assert "Traceback" not in output

    second = subprocess.run(pretrain_command(*args), cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert re.search(rf"resumed\b.*\bat step {stop_step}\b", output), output[-3000:]
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, 26))  # no step lost, none repeated
    assert checkpoint_steps(tmp_path) == [stop_step, 25]


def test_sigterm_while_torch_compile_traces_ends_as_documented(tmp_path, monkeypatch, capsys):
    # The signal lands while dynamo traces the first step, under fake tensors, where a tensor operation in the
    # handler used to fail the compilation (BackendCompilerFailed). The eager backend: the same tracing, without
    # inductor's code generation (most of a minute here).
    import mpp.engine
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(mpp.engine, "dynamo_backend", lambda cfg: "eager" if cfg.train.compile else None)
    real_enter, sent = FakeTensorMode.__enter__, []

    def enter(self):
        mode = real_enter(self)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return mode
    monkeypatch.setattr(FakeTensorMode, "__enter__", enter)
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused without tracing
    try:
        run_train(quick_config(tmp_path, "train.steps=6", "train.compile=true", "log.every=1"))
    finally:
        torch._dynamo.reset()
    assert sent
    (stop_step,) = checkpoint_steps(tmp_path)
    assert stop_step < 6 and f"stopped by signal at step {stop_step}; continue with resume=auto" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, stop_step + 1))


# ---- 8. two-process DDP on the CPU ----

DDP_OVERRIDES = ["train.steps=6", "train.warmup_steps=2", "train.batch_size=64", "train.micro_batch_size=16",
                 "log.every=1"]


def launch_ddp(tmp_path, *extra: str, out: str = "out", env: dict | None = None) -> subprocess.CompletedProcess:
    """tests/ddp_pretrain_check.py on 2 CPU processes: per-rank records in tmp_path/<out>, the run in tmp_path/run."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(REPO / "tests" / "ddp_pretrain_check.py"), str(tmp_path / out),
               *small_overrides(tmp_path / "run", *DDP_OVERRIDES, *extra)]
    return subprocess.run(command, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1", **(env or {})),
                          capture_output=True, text=True, timeout=300)


def read_ranks(tmp_path) -> list[dict]:
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text())
            for r in range(2) if (tmp_path / "out" / f"rank{r}.json").is_file()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """6 steps on 2 processes in fp32: the lockstep checks, and the reference of an exact resume."""
    tmp = tmp_path_factory.mktemp("ddp")
    result = launch_ddp(tmp, "train.mixed_precision=no")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return tmp


def test_ddp_two_cpu_processes_stay_in_lockstep(ddp_run):
    # A plain launch: mpp itself must see the launcher's two processes (on CPU, accelerate needs cpu=True).
    tmp_path = ddp_run
    infos = read_ranks(tmp_path)
    assert [(i["env_rank"], i["process_index"], i["num_processes"]) for i in infos] == [(0, 0, 2), (1, 1, 2)]
    # Each process took every optimizer step, each from 64 / (16 x 2) = 2 micro-batches.
    assert [i["optimizer_steps"] for i in infos] == [6, 6]
    assert [i["train_forwards"] for i in infos] == [12, 12]

    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    finals = [r["final"] for r in ranks]
    assert set(finals[0]) == set(finals[1])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    # The processes started from the same (broadcast) weights and trained: every trainable tensor moved.
    initial = ranks[0]["initial"]
    assert all(torch.equal(initial[k], ranks[1]["initial"][k]) for k in initial)
    fixed = {"encoder.pos_embed", "head.pos_embed"}
    moved = {k for k in initial if not torch.equal(initial[k], finals[0][k])}
    assert moved == set(initial) - fixed

    # One process wrote the run's files: one record per step, one checkpoint.
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))
    assert checkpoint_steps(tmp_path / "run") == [6]
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors")
    assert all(torch.equal(saved[k], finals[0][k]) for k in saved)


def test_ddp_stopped_and_resumed_run_ends_bit_identical(ddp_run, tmp_path):
    # Process 1 alone gets SIGTERM after a random step; the stop travels in the step's collective, both
    # processes checkpoint the next step and exit; resumed, the run must end as the uninterrupted one did.
    stop = random.randrange(1, 5)
    stopped = launch_ddp(tmp_path, "train.mixed_precision=no", out="stopped",
                         env={"MPP_TEST_SIGTERM_RANK1_AFTER": str(stop)})
    assert stopped.returncode == 0, (stopped.stdout + stopped.stderr)[-4000:]
    assert checkpoint_steps(tmp_path / "run") == [stop + 1]
    resumed = launch_ddp(tmp_path, "train.mixed_precision=no", "resume=auto", out="resumed")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert re.search(rf"resumed\b.*\bat step {stop + 1}\b", resumed.stdout + resumed.stderr)
    for rank in range(2):
        expected = torch.load(ddp_run / "out" / f"rank{rank}.pt")["final"]
        final = torch.load(tmp_path / "resumed" / f"rank{rank}.pt")["final"]
        differing = [k for k in expected if not torch.equal(final[k], expected[k])]
        assert not differing, f"process {rank}, stopped at step {stop + 1}: {differing[:3]} differ"
    assert ([(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run")]
            == [(r["step"], r["loss"]) for r in read_metrics(ddp_run / "run")])


def launch_ddp_two_nodes(tmp_path, *extra: str, out: str, env: dict | None = None) -> list:
    """launch_ddp's run as two "nodes" of one process each (conftest.launch_two_nodes)."""
    return launch_two_nodes([REPO / "tests" / "ddp_pretrain_check.py", tmp_path / out,
                             *small_overrides(tmp_path / "run", *DDP_OVERRIDES, *extra)], tmp_path / f"{out}-logs",
                            env=env)


def test_two_nodes_stopped_and_resumed_end_as_the_single_node_run(ddp_run, tmp_path):
    # Two nodes of one process each: node 1 alone is stopped (SIGTERM after step 2), both checkpoint the next step
    # and exit; resumed, each node ends bit-identical to the other and to the one-node 2-process run (ddp_run).
    # Each process's CPU threads as in the one-node run, where two processes share the cores (the float sums of a
    # matmul depend on its thread count).
    threads = f"train.cpu_threads={max(1, len(os.sched_getaffinity(0)) // 2)}"
    stopped = launch_ddp_two_nodes(tmp_path, "train.mixed_precision=no", threads, out="stopped",
                                   env={"MPP_TEST_SIGTERM_RANK1_AFTER": "2"})
    assert [r.returncode for r in stopped] == [0, 0], "\n".join(r.stdout[-3000:] for r in stopped)
    assert checkpoint_steps(tmp_path / "run") == [3]
    infos = [json.loads((tmp_path / "stopped" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(i["env_rank"], i["process_index"], i["num_processes"], i["optimizer_steps"]) for i in infos] == \
        [(0, 0, 2, 3), (1, 1, 2, 3)]
    resumed = launch_ddp_two_nodes(tmp_path, "train.mixed_precision=no", threads, "resume=auto", out="resumed")
    assert [r.returncode for r in resumed] == [0, 0], "\n".join(r.stdout[-3000:] for r in resumed)
    assert re.search(r"resumed\b.*\bat step 3\b", resumed[0].stdout)
    finals = [torch.load(tmp_path / "resumed" / f"rank{rank}.pt")["final"] for rank in range(2)]
    reference = torch.load(ddp_run / "out" / "rank0.pt")["final"]
    for rank, final in enumerate(finals):
        differing = [k for k in reference if not torch.equal(final[k], reference[k])]
        assert not differing, f"node {rank}: {differing[:3]} differ from the one-node run"
    assert ([(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run")]
            == [(r["step"], r["loss"]) for r in read_metrics(ddp_run / "run")])


def test_ddp_with_the_batch_terms(tmp_path):
    # The uniformity and contrastive terms gather features across processes in the forward and send
    # gradients back in the backward, between DDP's own collectives: the run must neither hang nor drift.
    result = launch_ddp(tmp_path, "model.uniformity=0.1", "model.contrastive=0.1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert [i["optimizer_steps"] for i in read_ranks(tmp_path)] == [6, 6]
    finals = [torch.load(tmp_path / "out" / f"rank{r}.pt")["final"] for r in range(2)]
    assert any(k.startswith("projector.") for k in finals[0])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:  # the terms averaged over processes, as the loss is
        assert r["loss"] == pytest.approx(r["loss_reconstruction"] + 0.1 * r["loss_uniformity"]
                                          + 0.1 * r["loss_contrastive"], rel=1e-5)



def test_mask_ratio_schedule_follows_the_step(tmp_path, monkeypatch):
    # model.mask.schedule: each step masks at the ratio of its place in the run, a function of the step alone.
    from mpp.models import MaskedImageModel
    seen = []
    real_forward = MaskedImageModel.forward

    def forward(self, imgs, mask_ratio=None):
        if self.training and torch.is_grad_enabled():
            seen.append(mask_ratio)
        return real_forward(self, imgs, mask_ratio)

    monkeypatch.setattr(MaskedImageModel, "forward", forward)
    run_train(quick_config(tmp_path, "train.steps=5", "model.mask.ratio=0.5", "model.mask.ratio_end=0.9",
                           "model.mask.schedule=linear", "log.image_every=1000"))
    assert seen == pytest.approx([0.5, 0.58, 0.66, 0.74, 0.82])
