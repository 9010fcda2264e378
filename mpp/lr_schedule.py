"""The learning-rate rules every stage shares (pretraining, fine-tuning, the linear probe)."""
from __future__ import annotations

from timm.scheduler import CosineLRScheduler

REFERENCE_BATCH = 256  # the batch size a recipe's base_lr is given for


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, as MAE applies it): the lr grows with the batch, so a recipe's
    base_lr holds for any batch size."""
    return base_lr * batch_size / REFERENCE_BATCH


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> CosineLRScheduler:
    """Linear warm-up from 0 over `warmup_steps`, then cosine to min_lr at `total_steps`, stepped every optimizer
    step (step_update). timm's scheduler multiplies each parameter group's `lr_scale` in (layer-wise lr decay)."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), warmup_t=warmup_steps,
                             warmup_prefix=True, warmup_lr_init=0.0, lr_min=min_lr, t_in_epochs=False)
