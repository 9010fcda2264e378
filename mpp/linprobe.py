"""Linear probe of a frozen encoder (MAE's protocol).

    accelerate launch mpp/linprobe.py RECIPE ckpt=PATH|none [key=value ...]
    python mpp/linprobe.py recipes/linprobe_quickstart.yaml ckpt=runs/quickstart

The feature (features.pool / features.blocks: the class token of the last block by default) goes
through BatchNorm without affine parameters and a linear layer, trained with LARS (or SGD / AdamW)
on the train split and evaluated on the val split, every sample counted once. ckpt=none probes a
randomly initialised encoder of the recipe's model: the baseline. Writes output_dir/linprobe.json
(top1, top5 as fractions, num_eval, the checkpoint, notes, the resolved config) and per-epoch
loss and val accuracy to output_dir/metrics.jsonl.

How the work is split: the encoder's forward passes (all but ~0.1% of the compute) are spread
over the processes by the exact loader and their features gathered, in the shards' order; the
head is then trained on the full feature matrix on every process alike (see `train_head`).
With probe.augment=false the features are extracted once (probe.cache: memory, or disk under
output_dir/features/ for later runs and knn.py); with augment=true (MAE) every epoch extracts
the features of fresh random-resized crops of every train sample.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import mpp from the repository root
    import _repo_root  # noqa: F401 - mpp/_repo_root.py

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from timm.optim import Lars, create_optimizer_v2

from mpp import engine
from mpp.classes import class_count
from mpp.config import EvalConfig, ProbeConfig
from mpp.data import normalizer
from mpp.data.loader import derive_seed
from mpp.evaluation import eval_accelerator, eval_loader, require_ckpt, require_data
from mpp.feature_cache import eval_features
from mpp.features import extract_features
from mpp.fileio import write_json
from mpp.knn import knn_accuracy, topk_accuracy
from mpp.lr_schedule import cosine_schedule, scaled_lr
from mpp.models import frozen_encoder
from mpp.recipe import ConfigError, to_dict
from mpp.runlog import RunLog


def build_head(num_features: int, num_classes: int, seed: int) -> torch.nn.Sequential:
    """MAE's probe head: BatchNorm1d without affine (eps 1e-6) then Linear, weights trunc_normal(std 0.01),
    bias 0; initialised from its own generator, so it is the same on every process and in every run."""
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(num_features, affine=False, eps=1e-6),
                               torch.nn.Linear(num_features, num_classes))
    generator = torch.Generator().manual_seed(derive_seed(seed, "probe head"))
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head[1].bias)
    return head


def build_optimizer(head: torch.nn.Module, probe: ProbeConfig, lr: float) -> torch.optim.Optimizer:
    """lars: timm's Lars with MAE's settings (momentum 0.9, trust coefficient 1e-3; weight decay and the trust
    ratio only for >1-D parameters). sgd: momentum SGD; adamw. (timm's groups: no decay on biases.)"""
    if probe.optimizer == "lars":
        # timm's Lars adapts a group only if it has weight decay or always_adapt: MAE adapts every weight
        # matrix (also with weight decay 0, its default) and no bias.
        matrices = [p for p in head.parameters() if p.ndim > 1]
        vectors = [p for p in head.parameters() if p.ndim <= 1]
        return Lars([{"params": matrices, "weight_decay": probe.weight_decay, "always_adapt": True},
                     {"params": vectors, "weight_decay": 0.0, "always_adapt": False}],
                    lr=lr, momentum=probe.momentum, trust_coeff=1e-3)
    name = "momentum" if probe.optimizer == "sgd" else probe.optimizer  # timm's "sgd" is Nesterov; plain momentum here
    return create_optimizer_v2(head, name, lr=lr, weight_decay=probe.weight_decay, momentum=probe.momentum)


def probe_size(n: int, probe) -> tuple[int, int, list[str]]:
    """(batch, epochs, notes) of a probe on n train samples: probe.batch_size and probe.epochs, unless they give
    an epoch fewer than probe.min_epoch_steps head updates (the batch shrinks, to 2 at least: BatchNorm) or the
    probe fewer than probe.min_steps (epochs are added); each change is noted."""
    if n < 2:
        raise ValueError(f"{n} train sample(s): the probe's BatchNorm needs batches of 2 or more")
    batch, epochs, notes = min(probe.batch_size, max(2, n // probe.min_epoch_steps)), probe.epochs, []
    if batch < probe.batch_size:
        notes.append(f"probe.batch_size={probe.batch_size} gives {n} train samples fewer than "
                     f"probe.min_epoch_steps={probe.min_epoch_steps} updates an epoch: batches of {batch}")
    steps = n // batch
    if epochs * steps < probe.min_steps:
        epochs = -(-probe.min_steps // steps)
        notes.append(f"probe.epochs={probe.epochs} of {steps} steps is fewer than probe.min_steps="
                     f"{probe.min_steps} head updates: {epochs} epochs")
    return batch, epochs, notes


def train_head(head, optimizer, scheduler, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
               steps: int, epoch: int, seed: int, first_step: int) -> float:
    """One epoch over the gathered features in global batches of a seeded permutation; the mean loss.

    Every process runs this on the same features with the same seeds: the head is not wrapped in DDP.
    It is ~0.1% of the probe's compute (a (B, F) x (F, C) matmul beside the encoder's forward passes),
    replicating it makes the result the same on any number of processes (the batches, and the
    BatchNorm statistics over them, are the global ones: no SyncBN needed) and costs no communication.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, "probe batches"))
    order = torch.randperm(len(labels), generator=generator).to(features.device)
    head.train()
    total = torch.zeros((), device=features.device)
    for s in range(steps):
        scheduler.step_update(first_step + s)
        index = order[s * batch_size:(s + 1) * batch_size]
        loss = F.cross_entropy(head(features[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return total.item() / steps


@torch.no_grad()
def evaluate(head, features: torch.Tensor, labels: torch.Tensor, chunk: int = 65536) -> dict[str, float]:
    head.eval()
    logits = torch.cat([head(features[i:i + chunk]) for i in range(0, len(features), chunk)])
    return topk_accuracy(logits, labels)


def run_probe(cfg: EvalConfig, recipe: str = "RECIPE", *, live: bool = False) -> tuple[dict, torch.nn.Module]:
    """The probe of an EvalConfig: (what linprobe.json holds, the trained head). Collective.

    live=True re-extracts the train features every epoch even without augmentation (the reference the
    cached probe must equal; features are a pure function of the images, so the heads are identical).
    """
    require_ckpt(cfg.ckpt, "linprobe.py", recipe)
    require_data(cfg.data, "linprobe.py", recipe)
    probe = cfg.probe
    if probe.epochs < 1 or probe.batch_size < 1:
        raise ConfigError(f"probe.epochs={probe.epochs} and probe.batch_size={probe.batch_size} must be at least 1")
    accelerator = eval_accelerator(cfg)
    device, start = accelerator.device, time.perf_counter()
    notes = [n for n in [engine.precision_note(accelerator, cfg.mixed_precision, "mixed_precision")] if n]
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # the same random-init encoder on every process
    vit, load_notes = frozen_encoder(cfg.model, cfg.ckpt)
    notes += load_notes
    vit.to(device)
    to_input = normalizer(cfg.data.mean, cfg.data.std, device)
    train_loader = eval_loader(cfg.data, "train", cfg.model.img_size, accelerator, seed=cfg.seed,
                               augment=probe.augment)
    val_loader = eval_loader(cfg.data, "val", cfg.model.img_size, accelerator, seed=cfg.seed)
    val_f, val_y = eval_features(cfg, accelerator, vit, val_loader, to_input, cfg.data.val_split)

    fixed = None

    def train_features(epoch: int):
        nonlocal fixed
        if fixed is not None:
            return fixed
        if probe.augment:
            train_loader.set_epoch(epoch)  # the crops are seeded by (seed, epoch): fresh ones every epoch
        if probe.augment or live:
            pair = extract_features(accelerator, vit, train_loader, to_input, cfg.features.pool, cfg.features.blocks)
        else:
            pair = eval_features(cfg, accelerator, vit, train_loader, to_input, cfg.data.train_split)
        pair = (pair[0].to(device), pair[1].to(device))
        if not (probe.augment or live):
            fixed = pair
        return pair

    train_f, train_y = train_features(0)
    num_classes, class_notes = class_count(cfg.data.train, train_y, val_y)
    notes += class_notes
    n = len(train_y)
    batch, epochs, sizing = probe_size(n, probe)
    notes += sizing
    steps = n // batch  # the incomplete last batch of an epoch is dropped (a new permutation every epoch)
    total, lr = epochs * steps, scaled_lr(probe.base_lr, batch)
    warmup = min(round(probe.warmup_epochs * steps), total - 1)
    head = build_head(train_f.shape[1], num_classes, cfg.seed).to(device)
    optimizer = build_optimizer(head, probe, lr)
    scheduler = cosine_schedule(optimizer, total, warmup, probe.min_lr)
    log = RunLog(accelerator, output_dir, epochs, 0)
    log.print(f"linear probe of {cfg.ckpt}: {n} train / {len(val_y)} val samples, {train_f.shape[1]} features, "
              f"{num_classes} classes; {epochs} epochs of {steps} steps of {batch}, "
              f"{probe.optimizer} lr {lr:.3g}")
    try:
        for epoch in range(epochs):
            if epoch:  # epoch 0's are at hand
                train_f, train_y = train_features(epoch)
            if len(train_y) != n:
                raise RuntimeError(f"epoch {epoch} read {len(train_y)} train samples, epoch 0 read {n}")
            loss = train_head(head, optimizer, scheduler, train_f, train_y, batch_size=batch, steps=steps,
                              epoch=epoch, seed=cfg.seed, first_step=epoch * steps)
            if not math.isfinite(loss):
                raise ValueError(f"the probe's loss is {loss} in epoch {epoch}; lower probe.base_lr "
                                 f"(now {probe.base_lr})")
            val = evaluate(head, val_f, val_y)
            log.update(loss=loss, top1=val["top1"])
            log.record(epoch + 1, {"loss": loss, "lr": optimizer.param_groups[0]["lr"],
                                   "val_top1": val["top1"], "val_top5": val["top5"]})
    finally:
        log.close()

    result = {**evaluate(head, val_f, val_y), "num_eval": len(val_y), "num_train": n, "num_classes": num_classes,
              "feature_dim": train_f.shape[1], "epochs": epochs, "batch_size": batch, "steps": total, "lr": lr,
              "train_loss": loss}  # the head's last epoch: a probe far from converged shows here
    if not probe.augment:
        # The centre-crop train features are at hand: kNN costs one similarity matmul more.
        result["knn"] = {**knn_accuracy(train_f, train_y, val_f, val_y, cfg.knn, num_classes, device),
                         "k": cfg.knn.k, "temperature": cfg.knn.temperature}
    result.update(ckpt=cfg.ckpt, notes=notes, seconds=round(time.perf_counter() - start, 1), config=to_dict(cfg))
    if accelerator.is_main_process:
        write_json(output_dir / "linprobe.json", result)
    for note in notes:
        accelerator.print(f"note: {note}")
    accelerator.print(f"linear probe of {cfg.ckpt}: top-1 {100 * result['top1']:.2f}%, top-5 "
                      f"{100 * result['top5']:.2f}% on {result['num_eval']} samples (head train loss {loss:.3f}); "
                      f"{output_dir / 'linprobe.json'}")
    accelerator.wait_for_everyone()
    return result, head


def main(argv: list[str] | None = None) -> int:
    return engine.main(run_probe, EvalConfig, __doc__, argv)  # one line per user error, exit 2 for config ones

if __name__ == "__main__":
    sys.exit(main())
