"""Where VT's visual tokens come from: each token's spatial attention over the feature map, the softmax over
positions of its tokenizer (mpp.models.vt: T = softmax_HW(scores)^T X), read by a forward hook on each
module's `spatial_softmax` while the encoder runs, as attention.py reads timm's attention.

The encoder contract: `blocks`, each with a `tokenizer.spatial_softmax` (VT modules), and `grid`.
"""
from __future__ import annotations

import torch

from .attention import eval_mode


def spatial_softmaxes(encoder) -> list[torch.nn.Module] | None:
    """Each VT module's spatial softmax, in depth order; None when the encoder has no VT modules."""
    found = [getattr(getattr(block, "tokenizer", None), "spatial_softmax", None)
             for block in getattr(encoder, "blocks", ())]
    return found if found and all(m is not None for m in found) else None


@torch.no_grad()
def token_maps(encoder, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Per VT module, each visual token's weights over the map's grid for every image: (B, L, H, W), each map
    summing to 1 (nothing hidden). imgs: normalised (B, C, H, W). ValueError when the encoder has no VT modules."""
    softmaxes = spatial_softmaxes(encoder)
    if softmaxes is None:
        raise ValueError("the encoder has no VT modules: no visual tokens' spatial attention to read")
    h, w = encoder.grid
    maps: list[torch.Tensor | None] = [None] * len(softmaxes)

    def keep(index: int, weights: torch.Tensor) -> None:  # (B, HW, L)
        maps[index] = weights.detach().float().transpose(1, 2).reshape(weights.shape[0], -1, h, w)

    handles = [m.register_forward_hook(lambda _m, _args, out, i=i: keep(i, out)) for i, m in enumerate(softmaxes)]
    try:
        with eval_mode(encoder):
            encoder.forward_features(imgs)
    finally:
        for handle in handles:
            handle.remove()
    return maps
