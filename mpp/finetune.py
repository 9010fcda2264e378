"""Fine-tuning: a timm ViT (or VT-ResNet) classifier initialised from a pretrained encoder (MAE's recipe).

    accelerate launch mpp/finetune.py recipes/finetune.yaml ckpt=PATH|none [key=value ...]
    python mpp/finetune.py recipes/finetune_quickstart.yaml ckpt=runs/quickstart model.img_size=48

ckpt: a pretraining (or fine-tuning) run folder, checkpoint folder or exported .safetensors; `none`
trains from random initialisation. Layer-wise lr decay (timm parameter groups), drop path, mixup /
cutmix with label smoothing, RandAugment and random erasing (timm transforms), average pooling with
fc-norm or the class token, optional EMA of the weights. Another img_size than pretraining's
resamples the position embeddings bicubically. Evaluates on the val split every epoch and at the
end (top-1 / top-5, every sample counted once on any number of processes); writes metrics.jsonl,
checkpoints (resume=auto continues a run), and finetune.json with the final numbers.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import mpp from the repository root
    import _repo_root  # noqa: F401 - mpp/_repo_root.py


import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from mpp import engine
from mpp.analysis.attention import distance_metrics
from mpp.classes import manifest_classes
from mpp.config import FinetuneRunConfig
from mpp.data import ShardLoader, normalizer, preview_images
from mpp.engine import Periodic, Trainer, Training, plan_schedule
from mpp.fileio import write_json
from mpp.knn import topk_hits
from mpp.lr_schedule import cosine_schedule
from mpp.models import build_encoder, set_fused_attn
from mpp.recipe import ConfigError, to_dict
from mpp.runtime import fused_attn
from mpp.weights import is_random_init, load_weights

NO_DATA = """data.train is not set: point it at labelled WebDataset shards (a `cls` label per sample).
  python -m data_tools.shard /path/to/class_folders /path/to/shards, then
  accelerate launch mpp/finetune.py {recipe} data.train=/path/to/shards ckpt=PATH
(or try the shipped sample: recipes/finetune_quickstart.yaml)"""
NO_CKPT = ("ckpt is not set: pass ckpt=PATH (a pretraining run folder, checkpoint folder or exported "
           ".safetensors) or ckpt=none to fine-tune from random initialisation")


def check_config(cfg: FinetuneRunConfig, recipe: str) -> None:
    f = cfg.finetune
    if cfg.data.train is None:
        raise ConfigError(NO_DATA.format(recipe=recipe))
    if cfg.ckpt is None:
        raise ConfigError(NO_CKPT)
    if cfg.model.tokenizer == "vt" and f.global_pool != "avg":
        raise ConfigError(f"finetune.global_pool={f.global_pool}: model.tokenizer=vt has no class token; VT "
                          f"classifies the mean of its tokens: set finetune.global_pool=avg")
    if (f.mixup > 0 or f.cutmix > 0) and cfg.train.micro_batch_size % 2:
        raise ConfigError(
            f"finetune.mixup={f.mixup} / finetune.cutmix={f.cutmix} need an even train.micro_batch_size (timm's "
            f"Mixup pairs each image with one from the batch's other half); got {cfg.train.micro_batch_size}: "
            f"make it even, or set finetune.mixup=0 finetune.cutmix=0")


def build_classifier(cfg: FinetuneRunConfig, num_classes: int) -> torch.nn.Module:
    """timm VisionTransformer with a head; pos_embed trainable; head initialised as MAE's fine-tuning does."""
    f = cfg.finetune
    vit = build_encoder(cfg.model, num_classes=num_classes, global_pool=f.global_pool, drop_path_rate=f.drop_path)
    vit.set_grad_checkpointing(cfg.train.grad_checkpointing)
    vit.pos_embed.requires_grad_(True)  # fixed sin-cos in pretraining, learnt from there on (MAE, BEiT)
    trunc_normal_(vit.head.weight, std=2e-5)  # MAE main_finetune.py: a near-zero head leaves the encoder's
    torch.nn.init.zeros_(vit.head.bias)       # features undisturbed in the first steps
    return vit


def build_optimizer(cfg: FinetuneRunConfig, model, lr: float, device: torch.device):
    """AdamW over timm's layer-decay groups: block i's lr scaled by layer_decay^(depth - i), the embeddings
    by layer_decay^(depth + 1), fc_norm and head by 1; no weight decay on 1-d tensors, tokens, pos_embed."""
    return engine.adamw(model, lr, cfg.optim, device, layer_decay=cfg.finetune.layer_decay)


def build_loss(f, num_classes: int):
    """(mixup or None, criterion): timm's Mixup makes soft targets (label smoothing included)."""
    if f.mixup > 0 or f.cutmix > 0:
        return (Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, label_smoothing=f.label_smoothing,
                      num_classes=num_classes), SoftTargetCrossEntropy())
    if f.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=f.label_smoothing)
    return None, torch.nn.CrossEntropyLoss()


def checked_labels(labels: torch.Tensor, valid: torch.Tensor, num_classes: int, spec) -> torch.Tensor:
    seen = labels[valid]
    if seen.numel() and (seen.min() < 0 or seen.max() >= num_classes):
        bad = seen[(seen < 0) | (seen >= num_classes)][0].item()
        raise ValueError(f"a sample of {spec!r} has label {bad}: " + (
            "the shards have no `cls` labels" if bad < 0 else
            f"finetune.num_classes={num_classes} is too small") + "; fine-tuning needs labels 0..num_classes-1")
    return labels


@torch.no_grad()
def evaluate(accelerator, model, loader, to_input, num_classes: int) -> dict:
    """Top-1, top-5 and cross-entropy over the loader's evaluation plan: each sample sits on exactly one
    process, padding is marked invalid, so summing over processes counts every sample once."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # top-1 hits, top-5 hits, loss, count
    loader.set_epoch(0)
    for batch in loader:
        valid = batch["valid"].to(accelerator.device)
        labels = checked_labels(batch["label"], batch["valid"], num_classes, loader.spec).to(accelerator.device)
        with accelerator.autocast():
            logits = model(to_input(batch["image"])).float()
        logits, labels = logits[valid], labels[valid]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums += torch.cat([topk_hits(logits, labels).double(), loss.double()[None],
                           torch.tensor([float(labels.numel())], dtype=torch.float64, device=labels.device)])
    top1, top5, loss, count = accelerator.reduce(sums, "sum").tolist()
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "count": int(count)}


def train(cfg: FinetuneRunConfig, recipe: str = "RECIPE") -> torch.nn.Module:
    check_config(cfg, recipe)
    f, data = cfg.finetune, cfg.data
    with Trainer(cfg) as trainer:
        where = dict(seed=cfg.seed, rank=trainer.process_index, world_size=trainer.num_processes,
                     num_workers=data.num_workers, mean=data.mean, std=data.std)
        loader = ShardLoader(data.train, mode="finetune", split=data.train_split, batch_size=cfg.train.micro_batch_size,
                             img_size=cfg.model.img_size, shuffle_buffer=data.shuffle_buffer,
                             augment=dict(auto_augment=f.rand_augment, re_prob=f.reprob), **where)
        val_loader = ShardLoader(data.val or data.train, mode="eval", split=data.val_split,
                                 batch_size=data.batch_size, img_size=cfg.model.img_size, crop_pct=data.crop_pct,
                                 **where)
        num_classes = f.num_classes or len(manifest_classes(data.train) or [])
        if not num_classes:
            raise ConfigError(f"data.train={data.train!r} has no manifest naming its classes: set finetune.num_classes")
        plan = plan_schedule(cfg, trainer.num_processes, loader.num_samples)
        # Shapes a checkpoint must share to continue this run (the head's included).
        model = to_dict(cfg.model)  # the tokenizer's own section (model.hybrid, model.t2t, model.vt) too
        shapes = {f"model.{k}": model[k] for k in ("tokenizer", "encoder", "img_size", "patch_size", "in_chans",
                                                    cfg.model.tokenizer) if k in model}
        resuming = trainer.check_resume({**shapes, "finetune.num_classes": f.num_classes,
                                         "finetune.global_pool": f.global_pool}) is not None

        # Built and loaded before anything is written: a checkpoint of another shape fails here.
        set_seed(cfg.seed)  # the same initialisation on every process (open() then seeds each its own way)
        model = build_classifier(cfg, num_classes)
        set_fused_attn(model, fused_attn(cfg, trainer.state.device))
        if resuming:
            notes = ["resuming: weights from this run's checkpoint, not ckpt"]
        elif is_random_init(cfg.ckpt):
            notes = ["ckpt=none: random initialisation"]
        else:
            notes = load_weights(model, cfg.ckpt)
        accelerator = trainer.open(plan)
        for note in notes:
            accelerator.print(f"note: {note}")

        optimizer = build_optimizer(cfg, model, plan.lr, accelerator.device)
        scheduler = cosine_schedule(optimizer, plan.total_steps, plan.warmup_steps, cfg.optim.min_lr)
        model.to(accelerator.device)
        ema = ModelEmaV3(model, decay=f.ema_decay) if f.ema else None
        model, optimizer = accelerator.prepare(model, optimizer)
        raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # not compiled: one-off calls
        if ema is not None:
            ema.set(raw_model)  # DDP broadcast process 0's weights: the average starts from them everywhere
        run = trainer.restore(model, optimizer, scheduler, plan, loader, {"ema": ema} if ema is not None else None)

        mixup, criterion = build_loss(f, num_classes)
        device = accelerator.device

        def micro_batches():
            for batch in loader.forever():
                x = batch["image"].to(device, non_blocking=True)
                y = checked_labels(batch["label"], batch["valid"], num_classes, data.train).to(device)
                yield mixup(x, y) if mixup is not None else (x, y)

        def loss_fn(model, batch):
            x, y = batch
            return criterion(model(x), y)

        to_input = normalizer(data.mean, data.std, device)
        results: dict = {}

        def validation(step: int) -> dict:
            results.update(step=step, model=evaluate(accelerator, raw_model, val_loader, to_input, num_classes))
            metrics = {"epoch": step / plan.steps_per_epoch,
                       **{f"val_{k}": v for k, v in results["model"].items()}}
            if ema is not None:
                results["ema"] = evaluate(accelerator, ema.module, val_loader, to_input, num_classes)
                metrics.update({f"ema_{k}": v for k, v in results["ema"].items()})
            trainer.log.print(f"step {step}: val top-1 {metrics['val_top1']:.4f}, top-5 {metrics['val_top5']:.4f}"
                              + (f" (EMA {metrics['ema_top1']:.4f}, {metrics['ema_top5']:.4f})" if ema else "")
                              + f" on {metrics['val_count']} images")
            return metrics

        summary = (f"{num_classes} classes, layer decay {f.layer_decay}, "
                   f"{'mixup/cutmix' if mixup else 'no mixup'}{', EMA' if ema else ''}")
        periodic = [Periodic(plan.steps_per_epoch, validation)]
        if cfg.log.attention_every > 0:
            fixed = to_input(preview_images(loader.urls[0], cfg.model.img_size, cfg.log.attention_images))
            periodic.append(Periodic(cfg.log.attention_every, lambda step: distance_metrics(raw_model, fixed)
                                     if accelerator.is_main_process else None))
        complete = trainer.fit(run, plan, Training(model, optimizer, scheduler, loader, micro_batches(), loss_fn),
                               summary=summary, periodic=periodic,
                               on_update=(lambda step: ema.update(raw_model, step=step)) if ema else None)
        if complete:
            if results.get("step") != run.step:  # resumed a finished run: evaluate what it holds
                trainer.log.record(run.step, validation(run.step))
            if accelerator.is_main_process:
                report = {**results["model"], "step": run.step, "epochs": run.step / plan.steps_per_epoch,
                          "num_eval": results["model"]["count"], "ckpt": cfg.ckpt, "notes": notes,
                          "config": to_dict(cfg)}
                if ema is not None:
                    report["ema"] = results["ema"]
                write_json(trainer.output_dir / "finetune.json", report)
    return raw_model


def main(argv: list[str] | None = None) -> int:
    return engine.main(train, FinetuneRunConfig, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
