"""The ViT paper's hybrid tokenizer: a ResNet's feature map as the token grid (timm's `vit_*_r50_s16_*`).

timm's own parts, as timm's hybrid ViTs build them: ResNetV2 stages of bottlenecks with GroupNorm and
weight-standardised convolutions ("same" padding), no pre-activation, and `HybridEmbed`, whose 1x1
convolution (patch size 1 on the map) turns every map position into a token. Layers (3, 4, 9) behind the
7x7/2 conv + 3x3/2 max-pool stem give stride 16 (the ViT paper: ResNet-50 with stage 4 removed and its blocks
moved to stage 3); the encoder's state dict is then timm's `vit_*_r50_s16_*`'s, key for key. For 32-px images
the stem is one 3x3/1 convolution + GroupNorm: stride 4, an 8 x 8 grid as ViT-Tiny/4's.

Masked pretraining: the ResNet is made mask-aware (sparse.py). The hidden tokens' pixels are set to 0 and
every convolution, pool and norm keeps them out, so no hidden pixel reaches a visible token; the hidden
tokens themselves carry nothing (the 1x1 convolution's bias) and the objective drops (MAE) or replaces
(SimMIM) them.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from torch import nn

from .sparse import mask_aware
from .vit import VIT_SIZES, ViTEncoder, build_vit

STEMS = {"timm": 4, "small": 1}  # stem -> its stride
STEM_WIDTH = 64
# timm's hybrid ViTs by their ResNetV2 layers (timm stem); the ViT's size is passed to them as keywords.
TIMM_HYBRIDS = {(3, 4, 9): "vit_base_r50_s16_224", (2, 2, 2, 2): "vit_base_r26_s32_224",
                (3, 4, 6, 3): "vit_large_r50_s32_224"}


def total_stride(layers, stem: str) -> int:
    """Pixels per token side: the stem's stride, then 2 for every stage after the first."""
    return STEMS[stem] * 2 ** (len(layers) - 1)


def resnetv2(layers, stem: str = "timm", in_chans: int = 3) -> ResNetV2:
    """timm's hybrid ResNetV2 (vision_transformer_hybrid._resnetv2 with SAME padding), with the small stem if asked."""
    conv = partial(StdConv2dSame, eps=1e-8)
    cnn = ResNetV2(layers=tuple(layers), num_classes=0, global_pool="", in_chans=in_chans, preact=False,
                   stem_type="same", conv_layer=conv)
    if stem == "small":
        cnn.stem = nn.Sequential(OrderedDict(conv=conv(in_chans, STEM_WIDTH, kernel_size=3, stride=1),
                                             norm=GroupNormAct(STEM_WIDTH, num_groups=32)))
    return cnn


class HybridTokens(HybridEmbed):
    """timm's HybridEmbed over a mask-aware CNN: `forward(imgs, hidden)` keeps the hidden tokens' pixels out."""
    masks_pixels = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visibility = mask_aware(self.backbone)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            return super().forward(x)
        visible = ~hidden.view(x.shape[0], 1, *self.grid_size)
        with self.visibility.showing(visible):
            return super().forward(self.visibility.hide(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not for the CNN: its mask-aware layers read the visible positions from a context (`showing`) that has
        ended when the backward pass would recompute them, which would then see every pixel. The encoder's
        transformer blocks are still checkpointed."""


def hybrid_encoder(size: str, img_size: int, patch_size: int, in_chans: int = 3, num_classes: int = 0,
                   pos_embed: str = "sincos", layers=(3, 4, 9), stem: str = "timm", **timm_kwargs) -> ViTEncoder:
    """A hybrid ViT of a named size (VIT_SIZES) on ResNetV2 `layers`; `patch_size` must be their total stride."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown hybrid stem {stem!r}; choose one of {', '.join(STEMS)}")
    stride = total_stride(layers, stem)
    if patch_size != stride or img_size % stride:
        raise ValueError(f"the hybrid's total stride is {stride} px (layers {list(layers)}, stem {stem}): patch size "
                         f"{patch_size} and image size {img_size} must be {stride} and a multiple of it")
    width, depth, heads = VIT_SIZES[size]
    backbone = resnetv2(layers, stem, in_chans)
    return build_vit(img_size=img_size, patch_size=1, in_chans=in_chans, num_classes=num_classes, embed_dim=width,
                     depth=depth, num_heads=heads, pos_embed=pos_embed,
                     embed_layer=partial(HybridTokens, backbone=backbone), **timm_kwargs)


def timm_hybrid(size: str, layers, stem: str) -> tuple[str, dict] | None:
    """(timm's registered name, the keywords that give it this size) of the hybrid, or None where timm has none."""
    name = TIMM_HYBRIDS.get(tuple(layers)) if stem == "timm" else None
    if name is None:
        return None
    width, depth, heads = VIT_SIZES[size]
    return name, dict(embed_dim=width, depth=depth, num_heads=heads)
