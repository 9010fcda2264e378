"""The training machinery every stage shares (pretraining, fine-tuning): processes and accelerator,
the resume rules, the run's output folder, the step loop with its logging, checkpoints and
signal stop. A stage supplies its model, optimizer, a stream of micro-batches and the loss
of one; everything that decides *when* things happen lives here, once.

    with Trainer(cfg) as trainer:              # processes (gloo DDP on CPUs)
        loader = ...; plan = plan_schedule(cfg, trainer.num_processes, loader.num_samples)
        trainer.check_resume(shape_settings)   # refuses a bad resume (or checkpoint) before anything is written
        accelerator = trainer.open(plan)       # accelerator, seed, threads
        ... build and prepare the model and optimizer ...
        run = trainer.restore(model, optimizer, scheduler, plan, loader)  # loads a checkpoint if resuming;
                                               # writes output_dir/config.yaml
        trainer.fit(run, plan, Training(model, optimizer, scheduler, loader, batches, loss_fn), periodic=[...])

`cfg` is any run config with output_dir, seed, resume, model, train, optim, log and checkpoint
sections (PretrainConfig, FinetuneRunConfig).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from timm.optim import create_optimizer_v2

from mpp.checkpoint import (MODEL_FILE, CheckpointError, SavedCheckpoint, apply_rng_states, check_safetensors,
                            first_line, list_checkpoints, read_checkpoint, resolve_resume, save_checkpoint,
                            tensor_bytes)
from mpp.flops import Utilisation, device_peak_flops, train_flops_per_image
from mpp.lr_schedule import scaled_lr
from mpp.recipe import ConfigError, load_config, save_config, to_dict
from mpp.runlog import METRICS_FILE, RunLog, check_trackers_installed, drop_records_after
from mpp.runtime import (CompileTrial, check_no_fsdp_on_cpu, cpu_ddp, dynamo_backend, effective_precision,
                         fsdp_requested, precision_note, resolve_settings, set_cpu_threads)


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
        self.rng_states = None  # a resumed run's RNG states, set just before its first step (see Trainer.fit)

    def state_dict(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "bad_samples": self.bad_samples,
                "lr_schedule": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bad_steps, self.bad_samples = state["step"], state["bad_steps"], state["bad_samples"]
        self.saved_lr_schedule = state["lr_schedule"]


class Window:
    """Loss, the loss's terms and throughput since the last metrics record."""

    def __init__(self, step: int):
        self.first_step, self.start, self.losses, self.term_sums = step, time.perf_counter(), [], {}

    def add(self, loss: float, terms: dict[str, float] | None = None) -> None:
        """Finite steps only; every step of a run reports the same terms."""
        if math.isfinite(loss):
            self.losses.append(loss)
            for name, value in (terms or {}).items():
                self.term_sums[name] = self.term_sums.get(name, 0.0) + value

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def mean_terms(self) -> dict[str, float]:
        """Each term's mean over the window, as `loss_<term>`."""
        return {f"loss_{name}": total / len(self.losses) for name, total in self.term_sums.items()}

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


def plan_schedule(cfg, num_processes: int, num_samples: int) -> Schedule:
    """Turn batch sizes, epochs and the data size into accumulation steps, step counts and the lr."""
    t = cfg.train
    per_step = t.micro_batch_size * num_processes
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size} "
            f"x {num_processes} processes = {per_step}; change either so that it is")
    if t.steps is None and not t.epochs > 0:
        raise ConfigError(f"train.epochs={t.epochs} trains nothing: set it above 0, or set train.steps")
    steps_per_epoch = max(1, num_samples // t.batch_size)
    total = t.steps if t.steps is not None else max(1, round(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch)
    return Schedule(grad_accum=t.batch_size // per_step, steps_per_epoch=steps_per_epoch, total_steps=total,
                    warmup_steps=min(warmup, total - 1), lr=scaled_lr(cfg.optim.base_lr, t.batch_size))


# Devices with torch's fused AdamW kernel: one pass over all tensors instead of ~10 ops per tensor.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(model, lr: float, optim, device: torch.device, **timm_kwargs):
    """timm's AdamW for `model` (no decay on 1-d tensors and model.no_weight_decay(); timm_kwargs such as
    layer_decay pass through), with torch's fused kernel where the device has one: its step took 4 ms against
    20 ms for the per-tensor loop on the ViT-Tiny/4 MAE's 191 trainable tensors on 2 CPU cores (README, "Performance")."""
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas),
                               fused=device.type in FUSED_ADAMW_DEVICES, **timm_kwargs)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_resumable(checkpoint: Path, saved: dict, settings: dict) -> None:
    """A checkpoint of another model shape cannot continue this run: say so before loading it.
    `saved`: the checkpoint's config; `settings`: dotted config keys that shape what is saved -> this run's values."""
    diff = {k: (_lookup(saved, k), v) for k, v in settings.items() if _lookup(saved, k) != v}
    if diff:
        raise ConfigError(f"cannot resume from {checkpoint}: its model differs from this run's "
                          + ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items()))


def model_settings(cfg) -> dict:
    """Every model.* key: the default `settings` for check_resumable."""
    return {f"model.{k}": v for k, v in to_dict(cfg.model).items()}


@dataclasses.dataclass
class Periodic:
    """Work the loop does every `every` steps (0: never) and, if `at_end`, after the last step: evaluation,
    images, online kNN. `fn(step)` runs on every process (it may use collectives) and returns metrics to
    record at that step, or None."""
    every: int
    fn: Callable[[int], dict | None]
    at_end: bool = True

    def due(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (last and self.at_end)


@dataclasses.dataclass
class Training:
    """What a stage hands Trainer.fit: the model, its optimizer and lr schedule, the loader (for its count of
    skipped samples), the stream of micro-batches and `loss_fn(model, micro_batch)` -> the loss, or (the loss,
    {name: term}) for a loss made of terms worth logging one by one."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm's CosineLRScheduler (mpp.lr_schedule), stepped with step_update(step)
    loader: object  # mpp.data.ShardLoader
    batches: Iterator
    loss_fn: Callable


def step_batches(batches: Iterator, count: int, stop_requested: list, stop_signal: torch.Tensor) -> Iterator:
    """A step's `count` micro-batches; once they are used, a stop requested meanwhile (a signal handler's flag)
    becomes stop_signal, which the step reduces next: the step during which a signal arrives is the last."""
    for _ in range(count):
        yield next(batches)
    if stop_requested:
        stop_signal.fill_(1.0)


def train_step(accelerator, model, optimizer, micro_batches: Iterable, grad_clip: float | None,
               stop_signal: torch.Tensor, loss_fn: Callable):
    """Forward and backward over the micro-batches (gradients synced after the last only), then one
    update, skipped if the loss is not finite on any process. `loss_fn(model, micro_batch)` -> the loss,
    or (the loss, {name: term}) for a loss made of terms worth logging one by one.

    Returns (mean loss over processes, whether any process asked to stop, grad norm if clipped, the
    terms' means over processes).
    """
    step_loss, step_terms, count = torch.zeros((), device=accelerator.device), {}, 0
    for batch in micro_batches:
        with accelerator.accumulate(model):
            loss = loss_fn(model, batch)
            loss, terms = loss if isinstance(loss, tuple) else (loss, {})
            accelerator.backward(loss)
        step_loss, count = step_loss + loss.detach(), count + 1
        for name, term in terms.items():
            step_terms[name] = step_terms.get(name, 0) + term.detach().float()
    # One collective a step: the mean loss (non-finite if it is anywhere), its terms and the stop requests.
    means = accelerator.reduce(torch.stack([step_loss / count, *(t / count for t in step_terms.values()),
                                            stop_signal]), "mean").tolist()
    loss_value, stop, terms = means[0], means[-1], dict(zip(step_terms, means[1:-1]))
    grad_norm = None
    if math.isfinite(loss_value):
        if grad_clip:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip).item()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, stop > 0, grad_norm, terms


class Trainer:
    """One training run: processes, resume rules, accelerator and output folder, then the step loop.
    A context manager: leaving it closes the log and ends the accelerator's trackers and process group."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cpu_ddp = cpu_ddp()
        self.state = PartialState(cpu=self.cpu_ddp)
        resolve_settings(cfg, self.state)  # precision and compile, before anything is built from them
        check_trackers_installed(cfg.log.trackers)
        check_no_fsdp_on_cpu(self.state.device)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint: Path | None = None
        self.saved: SavedCheckpoint | None = None  # the checkpoint's files, read and checked by check_resume
        self.accelerator: Accelerator | None = None
        self.log: RunLog | None = None
        self._checked = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        if self.log is not None:
            self.log.close()
        if self.accelerator is not None:
            self.accelerator.end_training()

    @property
    def process_index(self) -> int:
        return self.state.process_index

    @property
    def num_processes(self) -> int:
        return self.state.num_processes

    def check_resume(self, settings: dict | None = None) -> Path | None:
        """The resume rules, checked before anything is written: resume=null refuses a folder that holds
        checkpoints; resume=auto/PATH picks the checkpoint, whose model must match `settings`
        (default: every model.* key). Returns the checkpoint to resume from, or None."""
        existing = list_checkpoints(self.output_dir)
        if self.cfg.resume is None and existing:
            raise ConfigError(f"{self.output_dir} already holds a run's checkpoints (newest: {existing[-1].name});"
                              " continue it with resume=auto, or start afresh in another output_dir")
        self.checkpoint = resolve_resume(self.cfg.resume, self.output_dir)
        if self.checkpoint is not None:
            self.saved = read_checkpoint(self.checkpoint, self.process_index, model_file=self._model_file)
            check_resumable(self.checkpoint, self.saved.config,
                            model_settings(self.cfg) if settings is None else settings)
        self._checked = True
        return self.checkpoint

    @property
    def _model_file(self) -> bool:
        """Whether checkpoints hold the weights as model.safetensors (FSDP saves a layout of its own; asked for on
        a CPU, the run is refused)."""
        return not fsdp_requested()

    def open(self, plan: Schedule) -> Accelerator:
        """The accelerator (DDP, the resolved precision and compile, accumulation, trackers), seeded RNGs and CPU
        threads."""
        if not self._checked:
            self.check_resume()
        cfg = self.cfg
        # accelerate keeps one AcceleratorState per process and ignores a later Accelerator's precision and compile
        # settings; a process that runs several jobs (a notebook, the tests) gives each its own.
        AcceleratorState._reset_state()
        self.accelerator = accelerator = Accelerator(
            cpu=self.cpu_ddp, mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=plan.grad_accum,
            log_with=cfg.log.trackers or None, project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "tensorboard")),
            dynamo_backend=dynamo_backend(cfg),
        )
        set_seed(cfg.seed, device_specific=True)
        set_cpu_threads(cfg, accelerator.device)
        note = precision_note(accelerator, cfg.train.mixed_precision)
        if note:
            accelerator.print(f"note: {note}")
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(self.output_dir.name)  # the project's name (wandb, mlflow); TensorBoard's subfolder
        return accelerator

    def save_config(self) -> None:
        """output_dir/config.yaml: the run's config with its settings resolved (main process)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.output_dir / "config.yaml")

    def restore(self, model, optimizer, scheduler, plan: Schedule, loader, modules: dict | None = None) -> RunState:
        """Keep the run's position, the loader and `modules` (extra weights, e.g. {"ema": ...}) for checkpoints,
        load the checkpoint chosen by check_resume, if any (its shapes checked first), and write
        output_dir/config.yaml (only then: a refused checkpoint leaves its run's config as it was)."""
        accelerator, run = self.accelerator, RunState(scheduler)
        self._saved_objects = (run, loader, dict(modules or {}), model, optimizer)
        if self.saved is not None:
            self._load(self.saved, run, model, optimizer, loader, dict(modules or {}))
            accelerator.print(f"resumed from {self.checkpoint} at step {run.step}"
                              + (f": the run is complete ({plan.total_steps} steps)"
                                 if run.step >= plan.total_steps else ""))
            if run.saved_lr_schedule != scheduler.state_dict():
                accelerator.print("note: the lr schedule differs from the checkpoint's (train.steps, epochs or optim "
                                  "changed); following this run's config from the resumed step")
        self.save_config()
        return run

    def _load(self, saved: SavedCheckpoint, run: RunState, model, optimizer, loader, modules: dict) -> None:
        from safetensors.torch import load_model
        accelerator, path = self.accelerator, saved.path
        if self._model_file:
            raw = accelerator.unwrap_model(model, keep_torch_compile=False)
            check_safetensors(path / MODEL_FILE, {k: v.shape for k, v in raw.state_dict().items()})
        groups = [len(group["params"]) for group in optimizer.param_groups]
        if saved.optimizer_groups is not None and saved.optimizer_groups != groups:
            raise CheckpointError(f"cannot resume from {path}: optimizer.bin holds parameter groups of "
                                  f"{saved.optimizer_groups} tensors, this run's optimizer {groups}; resume with "
                                  f"the settings it was trained with, or start afresh in another output_dir")
        for name, module in modules.items():
            check_safetensors(path / f"{name}.safetensors", {k: v.shape for k, v in module.state_dict().items()})
        try:
            accelerator.load_state(str(path))  # every file it reads was checked above: weights only, no pickles
            run.load_state_dict(saved.state["run"])
            loader.load_state_dict(saved.state["loader"])
        except Exception as err:  # noqa: BLE001 - one line naming the checkpoint, not a traceback
            raise CheckpointError(f"cannot resume from {path}: loading it failed ({first_line(err)}). Resume from "
                                  f"an earlier checkpoint (resume=PATH) or start afresh in another output_dir") from None
        for name, module in modules.items():
            load_model(module, str(path / f"{name}.safetensors"))
        run.rng_states = saved.rng
        if saved.rng_note:
            accelerator.print(f"note: {saved.rng_note}")

    def save(self, step: int) -> None:
        """A checkpoint of the run at `step` (collective)."""
        run, loader, modules, model, optimizer = self._saved_objects
        raw = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        needed = tensor_bytes(raw.state_dict(), optimizer.state_dict(), *(m.state_dict() for m in modules.values()))
        save_checkpoint(self.accelerator, self.output_dir, step, self.cfg.checkpoint.keep, config=to_dict(self.cfg),
                        state={"run": run.state_dict(), "loader": loader.state_dict()}, modules=modules,
                        needed_bytes=needed)

    def fit(self, run: RunState, plan: Schedule, training: Training, *, summary: str = "",
            periodic: list[Periodic] = (), on_update: Callable[[int], None] | None = None) -> bool:
        """The step loop, from run.step to plan.total_steps. Every step: the lr, `training.loss_fn` and its backward
        for each micro-batch, one update (skipped when the loss is not finite anywhere), then `on_update(step)`
        after an applied update (EMA). Metrics every log.every steps; `periodic` work when due; a checkpoint every
        checkpoint.every steps, at the end and on a stop signal, never during a non-finite streak. SIGTERM/SIGINT
        finish the step, checkpoint and return. With train.compile=auto (a CPU run), the first steps are a
        CompileTrial that decides whether to go on compiled. Returns whether the run is complete."""
        cfg, model = self.cfg, training.model
        stop_signal = torch.zeros((), device=self.accelerator.device)  # this process's request, reduced every step
        with self._stop_on_signals() as stop_requested:
            trial = self._begin(run, plan, model, summary)
            bad_in_row, window = 0, Window(run.step)
            model.train()
            while run.step < plan.total_steps:
                training.scheduler.step_update(run.step)
                micro_batches = step_batches(training.batches, plan.grad_accum, stop_requested, stop_signal)
                began = time.perf_counter()
                loss, stop, grad_norm, terms = train_step(self.accelerator, trial.model() if trial else model,
                                                          training.optimizer, micro_batches, cfg.train.grad_clip,
                                                          stop_signal, training.loss_fn)
                if trial is not None and trial.record(time.perf_counter() - began):  # the step ended synchronised
                    model, trial = trial.model(), self._compile_decided(trial.decision)
                run.step += 1
                bad_in_row = self._non_finite_streak(run, loss, bad_in_row)
                if bad_in_row == 0 and on_update is not None:
                    on_update(run.step)

                lr = max(g["lr"] for g in training.optimizer.param_groups)  # layer decay scales the others down
                self.log.update(loss=loss, lr=lr)
                window.add(loss, terms)
                last = run.step == plan.total_steps
                if run.step % cfg.log.every == 0 or last:
                    self._record_metrics(run, plan, window, lr, grad_norm, training.loader)
                    window = Window(run.step)
                self._periodic_work([p for p in periodic if p.due(run.step, last)], run.step, model, window)
                # Weights that gave a non-finite loss must not push good checkpoints out.
                if bad_in_row == 0 and (run.step % cfg.checkpoint.every == 0 or last or stop):
                    self.save(run.step)
                if stop:
                    self.log.print(f"stopped by signal at step {run.step}; continue with resume=auto")
                    break
        return run.step >= plan.total_steps

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM and SIGINT, while the loop runs, only ask it to stop (the list it yields gets the signal): the
        step finishes and is checkpointed, so pre-emption loses nothing. The previous handlers come back after."""
        stop_requested = []

        def request_stop(signum, _frame):
            # Only a Python flag: a handler runs wherever the main thread is, also inside torch.compile's tracing,
            # where a tensor operation would be traced or refused (fake tensors); step_batches turns it into the
            # stop tensor the step reduces.
            stop_requested.append(signum)
        previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield stop_requested
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _begin(self, run: RunState, plan: Schedule, model, summary: str) -> CompileTrial | None:
        """Before the first step: the FLOP count and the peak for MFU, the metrics file cut back to run.step, the
        log and its opening line, a resumed run's RNG states, and the CompileTrial of train.compile=auto."""
        cfg, accelerator = self.cfg, self.accelerator
        raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # not compiled: one-off calls
        self._flops_per_image = train_flops_per_image(raw_model, cfg.model.img_size, cfg.model.in_chans,
                                                      accelerator.device)
        precision = effective_precision(accelerator)
        self._mfu = Utilisation(lambda: device_peak_flops(accelerator.device, precision, cfg.log.peak_tflops),
                                remeasure=accelerator.device.type == "cpu" and not cfg.log.peak_tflops)
        self._mfu_left_out = False
        if accelerator.is_main_process:  # the steps after run.step are done again: a reader sees each once
            drop_records_after(self.output_dir / METRICS_FILE, run.step)
        self.log = RunLog(accelerator, self.output_dir, plan.total_steps, run.step)
        self.log.print(f"{plan.total_steps} steps of {cfg.train.batch_size} images ({plan.steps_per_epoch} per "
                       f"epoch), {plan.grad_accum} micro-batch(es) of {cfg.train.micro_batch_size} per step on "
                       f"{accelerator.num_processes} process(es), lr {plan.lr:.3g}, "
                       f"{self._flops_per_image / 1e9:.3g} GFLOP/image" + (f"; {summary}" if summary else ""))
        if run.rng_states is not None:
            # A resumed run's RNG is set here, after the FLOP count and the peak measurement above have drawn
            # from it as they do in every run: its steps then draw what the uninterrupted run's did.
            apply_rng_states(run.rng_states)
        if cfg.train.compile != "auto":
            return None
        # A CPU run: compiled if a trial on its first steps shows a gain.
        trial = CompileTrial(model, plan.total_steps - run.step, lambda values: accelerator.reduce(
            torch.tensor(values, dtype=torch.float64, device=accelerator.device), "mean").tolist())
        return trial if trial.decision is None else self._compile_decided(trial.decision)

    def _non_finite_streak(self, run: RunState, loss: float, bad_in_row: int) -> int:
        """Non-finite steps in a row, up to this one; run.bad_steps counts them all. Too many in a row stop the run."""
        if math.isfinite(loss):
            return 0
        bad_in_row, run.bad_steps = bad_in_row + 1, run.bad_steps + 1
        if bad_in_row >= self.cfg.train.max_bad_steps:
            raise NonFiniteLoss(
                f"the loss was not finite for {bad_in_row} steps in a row (up to step {run.step}); stopped "
                f"without saving, so the newest checkpoint in {self.output_dir} is the last good one. Lower "
                f"optim.base_lr, set train.grad_clip, or use train.mixed_precision=bf16 instead of fp16, "
                f"then resume=auto.")
        return bad_in_row

    def _record_metrics(self, run: RunState, plan: Schedule, window: Window, lr: float, grad_norm: float | None,
                        loader) -> None:
        """One metrics record for the window (collective: the skipped-sample count is summed over processes)."""
        cfg, accelerator = self.cfg, self.accelerator
        # Corrupt samples the loader skipped (and replaced), summed over processes.
        skipped = accelerator.reduce(torch.tensor(float(loader.totals["bad"] - run.reported_bad),
                                                  device=accelerator.device), "sum").item()
        run.reported_bad, run.bad_samples = loader.totals["bad"], run.bad_samples + int(skipped)
        images_per_s = cfg.train.batch_size * window.steps(run.step) / window.seconds()
        metrics = {"epoch": run.step / plan.steps_per_epoch, "loss": window.mean_loss(), "lr": lr,
                   "img_per_s": images_per_s, "bad_steps": run.bad_steps,
                   "bad_samples": run.bad_samples, **window.mean_terms()}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        utilisation = self._mfu(images_per_s * self._flops_per_image / accelerator.num_processes)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        elif self._mfu.peak and not self._mfu_left_out:
            self._mfu_left_out = True
            self.log.print(f"note: mfu left out of the metrics: the step's FLOP/s exceed the device peak "
                           f"({self._mfu.peak / 1e12:.3g} TFLOP/s, measured twice), which cannot be; set "
                           f"log.peak_tflops to the device's true peak")
        self.log.record(run.step, metrics)

    def _periodic_work(self, due: list[Periodic], step: int, model, window: Window) -> None:
        """The work due at `step` (evaluation, images), its metrics recorded; its time is kept out of the window's
        img/s, a training figure."""
        if not due:
            return
        began = time.perf_counter()
        for work in due:
            extra = work.fn(step)
            if extra:
                self.log.record(step, extra)
        model.train()
        window.start += time.perf_counter() - began

    def _compile_decided(self, decision) -> None:
        """A CompileTrial's decision: into the config (saved again), and said."""
        self.cfg.train.compile, self.cfg.resolved.compile = decision.value, decision.reason
        self.save_config()
        self.log.print(f"train.compile: {decision.reason}")


def main(train: Callable, schema: type, doc: str, argv: list[str] | None = None) -> int:
    """A stage's command line: `RECIPE [key=value ...]` -> train(cfg, recipe=RECIPE). Errors the user can fix
    (config, missing files, bad data, a diverged run) print one line and exit 2 (config) or 1."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(doc)
        return 0 if args else 2
    try:
        cfg = load_config(schema, args[0], args[1:])
        train(cfg, recipe=args[0])
    except (ConfigError, FileNotFoundError, NonFiniteLoss, OSError, ValueError) as err:  # ValueError: bad data specs
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0
