"""Models. `build_model(cfg.model)` picks the pretraining objective by name; new objectives
(SimMIM, mean-colour prediction, ...) and tokenizers register here."""
from __future__ import annotations

from .mae import MAE
from .vit import VIT_SIZES, set_fused_attn, vit_encoder

OBJECTIVES = {"mae": MAE}


def build_model(model_cfg) -> MAE:
    kwargs = dict(vars(model_cfg))
    objective = kwargs.pop("objective")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown model.objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective](**kwargs)


__all__ = ["MAE", "OBJECTIVES", "VIT_SIZES", "build_model", "set_fused_attn", "vit_encoder"]
