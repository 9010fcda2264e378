"""Masked-patch pretraining, the main job.

    accelerate launch mpp/pretrain.py recipes/base.yaml [key=value ...]
    python mpp/pretrain.py recipes/quickstart.yaml train.steps=100

One code path for a laptop CPU, one GPU, many GPUs and many nodes: accelerate places the
model, wraps it for DDP/FSDP, runs mixed precision and accumulates gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch mpp/pretrain.py`): import the package from the repo root,
    # and keep mpp/ itself off the path so its modules cannot shadow top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import math
import os
import signal
import time

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mpp.checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from mpp.config import ConfigError, PretrainConfig, load_config, save_config, to_dict
from mpp.data import ShardLoader, normalizer, preview_images
from mpp.flops import device_peak_flops, train_flops_per_image
from mpp.models import build_model, set_fused_attn
from mpp.runlog import RunLog
from mpp.visualize import save_reconstruction

NO_DATA = """data.train is not set: point it at WebDataset shards.
  1. shard your images:  python -m data_tools.shard /path/to/images /path/to/shards
  2. train on them:      accelerate launch mpp/pretrain.py {recipe} data.train=/path/to/shards
(or try the shipped sample: accelerate launch mpp/pretrain.py recipes/quickstart.yaml)"""


class NonFiniteLoss(RuntimeError):
    pass


class RunState:
    """The loop's own position, saved in every checkpoint beside the model and optimizer.

    The lr schedule is a function of the config and the step, so it is rebuilt from the config on
    resume (a run can be extended with more steps); the checkpoint keeps its state for the record.
    """

    def __init__(self, scheduler):
        self.scheduler, self.step = scheduler, 0
        self.bad_steps = 0  # non-finite losses skipped
        self.bad_samples = 0  # corrupt samples the loader skipped, all processes, as of the last metrics record
        self.reported_bad = 0  # this process's loader count already in bad_samples (not saved: the loader restarts at 0)
        self.saved_lr_schedule = None

    def state_dict(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "bad_samples": self.bad_samples,
                "lr_schedule": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bad_steps, self.bad_samples = state["step"], state["bad_steps"], state["bad_samples"]
        self.saved_lr_schedule = state["lr_schedule"]


class Window:
    """Loss and throughput since the last metrics record."""

    def __init__(self, step: int):
        self.first_step, self.start, self.losses = step, time.perf_counter(), []

    def add(self, loss: float) -> None:
        if math.isfinite(loss):
            self.losses.append(loss)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def steps(self, step: int) -> int:
        return step - self.first_step

    def seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclasses.dataclass
class Schedule:
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float


def plan_schedule(cfg: PretrainConfig, num_processes: int, num_samples: int) -> Schedule:
    """Turn batch sizes, epochs and the data size into accumulation steps, step counts and the lr."""
    t = cfg.train
    per_step = t.micro_batch_size * num_processes
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size} "
            f"x {num_processes} processes = {per_step}; change either so that it is")
    steps_per_epoch = max(1, num_samples // t.batch_size)
    total = t.steps if t.steps is not None else max(1, round(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch)
    return Schedule(grad_accum=t.batch_size // per_step, steps_per_epoch=steps_per_epoch, total_steps=total,
                    warmup_steps=min(warmup, total - 1), lr=cfg.optim.base_lr * t.batch_size / 256)


def effective_precision(accelerator) -> str:
    """What the matmuls really run in: accelerate runs fp32 when fp16 is asked for on a CPU."""
    if accelerator.mixed_precision in ("fp16", "bf16") and not accelerator.native_amp:
        return "no"
    return accelerator.mixed_precision


def set_cpu_threads(cfg: PretrainConfig, device: torch.device) -> None:
    """Use this machine's cores on a CPU run. `accelerate launch` sets OMP_NUM_THREADS=1 unless given
    --cpu, which halved the quickstart's speed on a 2-core machine (README, "Performance")."""
    if device.type == "cpu":
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // processes_here))


def check_resumable(checkpoint: Path, cfg: PretrainConfig) -> None:
    """A checkpoint of another model shape cannot continue this run: say so before loading it."""
    import yaml
    saved_path = checkpoint / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()).get("model", {})
    diff = {k: (saved.get(k), v) for k, v in to_dict(cfg.model).items() if saved.get(k) != v}
    if diff:
        raise ConfigError(f"cannot resume from {checkpoint}: its model differs from this run's "
                          + ", ".join(f"model.{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items()))


def build_training(cfg: PretrainConfig, plan: Schedule, device: torch.device):
    """The model, its AdamW (no decay on norms, biases, tokens, position embeddings) and the lr schedule."""
    model = build_model(cfg.model)
    set_fused_attn(model, cfg.train.fused_attn if cfg.train.fused_attn is not None else device.type != "cpu")
    optimizer = create_optimizer_v2(model, "adamw", lr=plan.lr, weight_decay=cfg.optim.weight_decay,
                                    betas=tuple(cfg.optim.betas))
    scheduler = CosineLRScheduler(optimizer, t_initial=plan.total_steps - plan.warmup_steps,
                                  warmup_t=plan.warmup_steps, warmup_prefix=True, warmup_lr_init=0.0,
                                  lr_min=cfg.optim.min_lr, t_in_epochs=False)
    return model, optimizer, scheduler


def train_step(accelerator, model, optimizer, micro_batches, grad_clip: float | None, stop_signal: torch.Tensor):
    """Forward and backward over the micro-batches (gradients synced after the last only), then one
    update, skipped if the loss is not finite on any process.

    Returns (mean loss over processes, whether any process asked to stop, grad norm if clipped).
    """
    step_loss, count = torch.zeros((), device=accelerator.device), 0
    for imgs in micro_batches:
        with accelerator.accumulate(model):
            loss, _, _ = model(imgs)
            accelerator.backward(loss)
        step_loss, count = step_loss + loss.detach(), count + 1
    # One collective a step: the mean loss (non-finite if it is anywhere) and the stop requests.
    loss_value, stop = accelerator.reduce(torch.stack([step_loss / count, stop_signal]), "mean").tolist()
    grad_norm = None
    if math.isfinite(loss_value):
        if grad_clip:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip).item()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, stop > 0, grad_norm


def train(cfg: PretrainConfig, recipe: str = "RECIPE") -> torch.nn.Module:
    if cfg.data.train is None:
        raise ConfigError(NO_DATA.format(recipe=recipe))
    # Launched as several processes on a machine without GPUs: accelerate sets up gloo DDP only if told cpu=True.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=cpu_ddp)
    # A spec that matches nothing, or has no sample counts, fails here, before anything is written.
    loader = ShardLoader.from_config(cfg.data, mode="pretrain", img_size=cfg.model.img_size,
                                     batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                                     rank=state.process_index, world_size=state.num_processes)
    plan = plan_schedule(cfg, state.num_processes, loader.num_samples)
    output_dir = Path(cfg.output_dir)
    existing = list_checkpoints(output_dir)
    if cfg.resume is None and existing:
        raise ConfigError(f"{output_dir} already holds a run's checkpoints (newest: {existing[-1].name});"
                          " continue it with resume=auto, or start afresh in another output_dir")
    checkpoint = resolve_resume(cfg.resume, output_dir)
    if checkpoint is not None:
        check_resumable(checkpoint, cfg)
    accelerator = Accelerator(
        cpu=cpu_ddp, mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=plan.grad_accum,
        log_with="tensorboard" if cfg.log.tensorboard else None, project_dir=str(output_dir),
        dynamo_backend="inductor" if cfg.train.compile else None,
    )
    set_seed(cfg.seed, device_specific=True)
    set_cpu_threads(cfg, accelerator.device)
    if effective_precision(accelerator) != cfg.train.mixed_precision:
        accelerator.print(f"note: train.mixed_precision={cfg.train.mixed_precision} is not available on "
                          f"{accelerator.device.type}; running fp32 (on CPUs, bf16 is the mixed precision)")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    accelerator.init_trackers("tensorboard")

    model, optimizer, scheduler = build_training(cfg, plan, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = RunState(scheduler)
    accelerator.register_for_checkpointing(run, loader)  # the loader's state: its epoch and batches consumed

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {run.step}"
                          + (f": the run is complete ({plan.total_steps} steps)" if run.step >= plan.total_steps else ""))
        if run.saved_lr_schedule != scheduler.state_dict():
            accelerator.print("note: the lr schedule differs from the checkpoint's (train.steps, epochs or optim changed); "
                              "following this run's config from the resumed step")
    start_step = run.step

    raw_model = accelerator.unwrap_model(model)
    flops_per_image = train_flops_per_image(raw_model, cfg.model.img_size, cfg.model.in_chans, accelerator.device)
    peak = device_peak_flops(accelerator.device, cfg.train.mixed_precision, cfg.log.peak_tflops)
    to_input = normalizer(cfg.data.mean, cfg.data.std, accelerator.device)
    batches = loader.forever()

    stop_signal = torch.zeros((), device=accelerator.device)
    def request_stop(signum, _frame):  # finish the step, checkpoint, exit: pre-emption loses nothing
        stop_signal.fill_(1.0)
    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    log = RunLog(accelerator, output_dir, plan.total_steps, start_step)
    log.print(f"{plan.total_steps} steps of {cfg.train.batch_size} images ({plan.steps_per_epoch} per epoch), "
              f"{plan.grad_accum} micro-batch(es) of {cfg.train.micro_batch_size} per step on "
              f"{accelerator.num_processes} process(es), lr {plan.lr:.3g}, {flops_per_image / 1e9:.3g} GFLOP/image")
    preview = to_input(preview_images(loader.urls[0], cfg.model.img_size))
    try:
        bad_in_row, window = 0, Window(start_step)
        model.train()
        while run.step < plan.total_steps:
            scheduler.step_update(run.step)
            micro_batches = (to_input(next(batches)["image"]) for _ in range(plan.grad_accum))
            loss_value, stop, grad_norm = train_step(accelerator, model, optimizer, micro_batches,
                                                     cfg.train.grad_clip, stop_signal)
            if math.isfinite(loss_value):
                bad_in_row = 0
            else:
                bad_in_row, run.bad_steps = bad_in_row + 1, run.bad_steps + 1
            run.step += 1
            if bad_in_row >= cfg.train.max_bad_steps:
                raise NonFiniteLoss(
                    f"the loss was not finite for {bad_in_row} steps in a row (up to step {run.step}); stopped "
                    f"without saving, so the newest checkpoint in {output_dir} is the last good one. Lower "
                    f"optim.base_lr, set train.grad_clip, or use train.mixed_precision=bf16 instead of fp16, "
                    f"then resume=auto.")

            lr = optimizer.param_groups[0]["lr"]
            log.update(loss=loss_value, lr=lr)
            window.add(loss_value)
            last = run.step == plan.total_steps
            if run.step % cfg.log.every == 0 or last:
                # Corrupt samples the loader skipped (and replaced), summed over processes.
                skipped = accelerator.reduce(torch.tensor(float(loader.totals["bad"] - run.reported_bad),
                                                          device=accelerator.device), "sum").item()
                run.reported_bad, run.bad_samples = loader.totals["bad"], run.bad_samples + int(skipped)
                images_per_s = cfg.train.batch_size * window.steps(run.step) / window.seconds()
                metrics = {"epoch": run.step / plan.steps_per_epoch, "loss": window.mean_loss(), "lr": lr,
                           "img_per_s": images_per_s, "bad_steps": run.bad_steps,
                           "bad_samples": run.bad_samples}
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                if peak:
                    metrics["mfu"] = images_per_s * flops_per_image / (peak * accelerator.num_processes)
                log.record(run.step, metrics)
                window = Window(run.step)
            if accelerator.is_main_process and (run.step % cfg.log.image_every == 0 or last):
                save_reconstruction(raw_model, preview, cfg.data.mean, cfg.data.std,
                                    output_dir / "reconstructions" / f"step_{run.step:08d}.png", seed=cfg.seed)
            # Weights that gave a non-finite loss must not push good checkpoints out.
            if bad_in_row == 0 and (run.step % cfg.checkpoint.every == 0 or last or stop):
                save_checkpoint(accelerator, output_dir, run.step, cfg.checkpoint.keep, config=to_dict(cfg))
            if stop:
                log.print(f"stopped by signal at step {run.step}; continue with resume=auto")
                break
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        log.close()
        accelerator.end_training()
    return raw_model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        cfg = load_config(PretrainConfig, args[0], args[1:])
        train(cfg, recipe=args[0])
    except (ConfigError, FileNotFoundError, NonFiniteLoss, OSError, ValueError) as err:  # ValueError: bad data specs
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
