"""Masked-patch pretraining, the main job.

    accelerate launch mpp/pretrain.py recipes/base.yaml [key=value ...]
    python mpp/pretrain.py recipes/quickstart.yaml train.steps=100

One code path for a laptop CPU, one GPU, many GPUs and many nodes: accelerate places the
model, wraps it for DDP/FSDP, runs mixed precision and accumulates gradients.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import mpp from the repository root
    import _repo_root  # noqa: F401 - mpp/_repo_root.py

import dataclasses
import functools

import torch

from mpp import engine
from mpp.analysis.attention import distance_metrics
from mpp.config import PretrainConfig
from mpp.data import ShardLoader, normalizer, preview_images
from mpp.engine import Periodic, RunState, Schedule, Trainer, Training, plan_schedule
from mpp.knn import OnlineKnn
from mpp.lr_schedule import cosine_schedule
from mpp.models import build_model, ratio_at, set_fused_attn
from mpp.recipe import ConfigError
from mpp.runtime import fused_attn
from mpp.visualize import save_reconstruction

NO_DATA = """data.train is not set: point it at WebDataset shards.
  1. shard your images:  python -m data_tools.shard /path/to/images /path/to/shards
  2. train on them:      accelerate launch mpp/pretrain.py {recipe} data.train=/path/to/shards
(or try the shipped sample: accelerate launch mpp/pretrain.py recipes/quickstart.yaml)"""


def pretrain_loss(model, imgs: torch.Tensor, mask_ratio: float | None = None):
    """The loss, and its terms when it has more than one (logged as loss_<term>)."""
    out = model(imgs, mask_ratio=mask_ratio)
    return out.loss, (out.terms if len(out.terms) > 1 else {})


def scheduled_loss(cfg: PretrainConfig, run: RunState, plan: Schedule):
    """pretrain_loss at the mask ratio of the run's current step (model.mask.schedule)."""
    mask = cfg.model.mask
    if mask.schedule == "constant" or mask.ratio_end is None:
        return pretrain_loss  # the model's own ratio: nothing changes between steps
    return lambda model, imgs: pretrain_loss(
        model, imgs, ratio_at(mask.ratio, mask.ratio_end, mask.schedule, run.step / plan.total_steps))


# Pretraining's optimizer step, as mpp/bench.py times it: train_step(accelerator, model, optimizer,
# micro_batches, grad_clip, stop_signal).
train_step = functools.partial(engine.train_step, loss_fn=pretrain_loss)


def build_training(cfg: PretrainConfig, plan: Schedule, device: torch.device):
    """The model, its AdamW (no decay on norms, biases, tokens, position embeddings) and the lr schedule."""
    model = build_model(cfg.model, cfg.data.mean, cfg.data.std)
    set_fused_attn(model, fused_attn(cfg, device))
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    optimizer = engine.adamw(model, plan.lr, cfg.optim, device)
    return model, optimizer, cosine_schedule(optimizer, plan.total_steps, plan.warmup_steps, cfg.optim.min_lr)


def train(cfg: PretrainConfig, recipe: str = "RECIPE") -> torch.nn.Module:
    if cfg.data.train is None:
        raise ConfigError(NO_DATA.format(recipe=recipe))
    with Trainer(cfg) as trainer:
        # A spec that matches nothing, or has no sample counts, fails here, before anything is written.
        loader = ShardLoader.from_config(cfg.data, mode="pretrain", img_size=cfg.model.img_size,
                                         batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                                         rank=trainer.process_index, world_size=trainer.num_processes)
        plan = plan_schedule(cfg, trainer.num_processes, loader.num_samples)
        trainer.check_resume()  # every model.* key must match a checkpoint resumed from
        accelerator = trainer.open(plan)

        model, optimizer, scheduler = build_training(cfg, plan, accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        run = trainer.restore(model, optimizer, scheduler, plan, loader)  # the loader's state: its epoch and batches

        # Previews and kNN run the module itself: under train.compile they would each compile graphs of their own
        # (eval mode, no grad) for a call every thousand steps.
        raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        to_input = normalizer(cfg.data.mean, cfg.data.std, accelerator.device)
        batches = (to_input(batch["image"]) for batch in loader.forever())
        output_dir = trainer.output_dir
        preview = to_input(preview_images(loader.urls[0], cfg.model.img_size))

        def reconstruction(step: int) -> None:
            if accelerator.is_main_process:
                save_reconstruction(raw_model, preview, cfg.data.mean, cfg.data.std,
                                    output_dir / "reconstructions" / f"step_{step:08d}.png", seed=cfg.seed)

        periodic = [Periodic(cfg.log.image_every, reconstruction)]
        if cfg.log.attention_every > 0:
            fixed = to_input(preview_images(loader.urls[0], cfg.model.img_size, cfg.log.attention_images))
            periodic.append(Periodic(cfg.log.attention_every, lambda step: distance_metrics(raw_model.encoder, fixed)
                                     if accelerator.is_main_process else None))
        if cfg.knn.every > 0:
            # The encoder sees images normalised as in pretraining, whatever knn.data says.
            knn_data = dataclasses.replace(cfg.knn.data, mean=cfg.data.mean, std=cfg.data.std)
            knn = OnlineKnn(dataclasses.replace(cfg.knn, data=knn_data), cfg.model, accelerator, cfg.seed)
            periodic.append(Periodic(cfg.knn.every, lambda step: knn.run(raw_model.encoder)))
        trainer.fit(run, plan, Training(model, optimizer, scheduler, loader, batches, scheduled_loss(cfg, run, plan)),
                    periodic=periodic)
    return raw_model


def main(argv: list[str] | None = None) -> int:
    return engine.main(train, PretrainConfig, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
