"""What a ViT's embeddings hold before any attention: the position embeddings' similarity and the principal
components of the first filters that see pixels (the ViT paper, section 4.5, figure 7).

The encoder contract: `pos_embed` (1, prefix + H*W, D) over the token grid `grid` (a model with no position
embedding has no such figure), and `patch_embed`, whose first convolution or linear layer on the pixels gives
the filters: a patch ViT's projection (D filters of C x P x P), a hybrid's first convolution of its CNN stem.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def position_similarity(encoder) -> torch.Tensor | None:
    """(H*W, H*W) cosine similarity between the position embeddings of every two grid positions, raster order
    (prefix tokens' rows left out); None when the encoder has no position embedding over its grid."""
    pos = getattr(encoder, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        return None
    h, w = encoder.grid
    if pos.shape[1] < h * w:
        return None
    rows = F.normalize(pos.detach()[0, pos.shape[1] - h * w:].float(), dim=-1)
    return rows @ rows.T


def first_filters(encoder, channels: int) -> torch.Tensor | None:
    """(F, C, k, k) the filters of the first layer of `encoder.patch_embed` that reads the image's C channels:
    its first Conv2d taking C channels (square kernel), else its first Linear of C * k * k inputs (a patch
    unfolded channel-major, as nn.Unfold does); None if there is neither."""
    embed = getattr(encoder, "patch_embed", None)
    if embed is None:
        return None
    for module in embed.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == channels and module.groups == 1:
            weight = module.weight.detach()
            return weight if weight.shape[-1] == weight.shape[-2] else None
        if isinstance(module, nn.Linear) and module.in_features % channels == 0:
            side = math.isqrt(module.in_features // channels)
            if side * side * channels == module.in_features:
                return module.weight.detach().reshape(-1, channels, side, side)
    return None


def principal_components(filters: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `count` principal components of F filters (F, C, k, k), each flattened: (components (count, C, k,
    k), unit norm, their share of the filters' variance (count,)). The filters are centred on their mean
    first. A component's sign is arbitrary: each is turned so its largest entry is positive."""
    flat = filters.detach().flatten(1).double()
    centred = flat - flat.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    count = min(count, vh.shape[0])
    components = vh[:count]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    share = singular.pow(2) / singular.pow(2).sum().clamp(min=1e-30)
    return components.float().reshape(count, *filters.shape[1:]), share[:count].float()
