"""What a ViT's embeddings hold before any attention: the position embeddings' similarity and the principal
components of the first filters that see pixels (the ViT paper, section 4.5, figure 7).

The encoder contract: `pos_embed` (1, prefix + H*W, D) over the token grid `grid` (a model with no position
embedding has no such figure), and `patch_embed` (or, for VT, `backbone`), whose first layer on the pixels gives
the filters: a patch ViT's projection (D filters of C x P x P), the first convolution of a hybrid's or VT's CNN
(weight-standardised as it convolves, for timm's StdConv), T2T's value projection of its first soft split's
windows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import StdConv2d, StdConv2dSame
from torch import nn

from mpp.models.t2t import T2TTokens


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


def first_filters(encoder, channels: int) -> tuple[torch.Tensor, str] | None:
    """(F, C, k, k) the filters of the first layer that reads the image's C channels, and what they are; None if
    there is none. In `encoder.patch_embed` (else `encoder.backbone`, VT's ResNet): T2T's first T2T layer (its
    value projection), else the first Conv2d taking C channels (square kernel, as it convolves), else the first
    Linear of C * k * k inputs (a patch unfolded channel-major, as nn.Unfold does)."""
    holder = "patch_embed" if getattr(encoder, "patch_embed", None) is not None else "backbone"
    embed = getattr(encoder, holder, None)
    if embed is None:
        return None
    if isinstance(embed, T2TTokens) and hasattr(embed, "attention1"):
        return t2t_filters(embed, channels)
    for name, module in embed.named_modules(prefix=holder):
        if isinstance(module, nn.Conv2d) and module.in_channels == channels and module.groups == 1:
            if module.weight.shape[-1] != module.weight.shape[-2]:
                return None
            what = f"{name}: the first convolution on the pixels"
            if isinstance(module, (StdConv2d, StdConv2dSame)):
                return standardized(module), what + " (weight-standardised, as it convolves)"
            return module.weight.detach(), what
        if isinstance(module, nn.Linear) and module.in_features % channels == 0:
            side = math.isqrt(module.in_features // channels)
            if side * side * channels == module.in_features:
                return module.weight.detach().reshape(-1, channels, side, side), f"{name}: the patch projection"
    return None


def standardized(conv) -> torch.Tensor:
    """The weight timm's StdConv2d / StdConv2dSame convolves with: each filter less its mean, over its std."""
    weight = conv.weight.detach()
    return F.batch_norm(weight.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0,
                        eps=conv.eps).reshape_as(weight)


def t2t_filters(embed: T2TTokens, channels: int) -> tuple[torch.Tensor, str]:
    """T2T's first learned map on the pixels: soft split 0 unfolds k x k windows (no weights), the first T2T
    layer normalises each window (LayerNorm) and its value projection makes the token (the layer's residual
    is taken from v). Its rows, with the LayerNorm's gain folded in, are filters of a contrast-normalised window:
    (token width, C, k, k)."""
    layer, kernel = embed.attention1, embed.soft_split0.kernel_size
    width = layer.attn.out_dim
    value = layer.attn.qkv.weight.detach()[2 * width:] * layer.norm1.weight.detach()
    return (value.reshape(width, channels, kernel, kernel),
            f"patch_embed.attention1.attn.qkv (its value rows x norm1's gain): the first T2T layer's projection of "
            f"each {kernel}x{kernel} window of soft split 0, after the window's LayerNorm")


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
