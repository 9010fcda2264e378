"""T2T-ViT (Yuan et al., 2021): the Tokens-to-Token module as the tokenizer of a timm VisionTransformer.

Soft split: an unfold of k x k windows with stride < k, each window's values concatenated into one token.
Between two soft splits a T2T layer re-structurizes the tokens (one-head attention, then an MLP of ratio 1;
its widths differ in and out, so the residual is taken from v) and they are put back on their 2-D grid. The
paper's module at 224 px, token width 64: soft split 7/4/2 (kernel/stride/padding) -> 56 x 56 tokens of 147
values -> T2T layer -> 64 -> soft split 3/2/1 -> 28 x 28 x 576 -> T2T layer -> soft split 3/2/1 -> 14 x 14 x
576 -> linear to the backbone's width: total stride 16. For 32-px images the stack is scaled to 3/1/1,
3/2/1, 3/2/1 (model.t2t.splits): stride 4, an 8 x 8 grid. Plain attention (the paper's T2T-ViT_t), which the
reference code also offers beside its Performer. The backbone is timm's ViT with T2T-ViT's sizes (qkv
without bias, as the reference); mpp's fixed sin-cos positions stand for its sinusoid table.

Module names follow the reference code (soft_split0, attention1 ..., project), so its T2T-ViT_t weights map
onto `patch_embed.*` by renaming `tokens_to_token.`.

Masked pretraining: every soft split overlaps its neighbours and every T2T layer attends over all tokens, so
a token dropped or replaced after the module would already have reached the visible ones. The hidden
tokens' pixels (squares of the total stride, the mask grid) are set to 0 in pixel space before soft split 0:
SimMIM's fill, with no parameter of its own; the objective's loss scores the masked pixels only.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .patches import token_mask_to_pixels
from .vit import ViTEncoder, build_vit

# name -> (width, depth, heads, MLP ratio) of the backbone (the paper's Table 2)
T2T_SIZES = {
    "t2t_7": (256, 7, 4, 2.0),
    "t2t_10": (256, 10, 4, 2.0),
    "t2t_12": (256, 12, 4, 2.0),
    "t2t_14": (384, 14, 6, 3.0),
    "t2t_19": (448, 19, 7, 3.0),
    "t2t_24": (512, 24, 8, 3.0),
}
PAPER_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of each soft split at 224 px


def split_sizes(img_size: int, splits) -> list[int]:
    """The grid side after each soft split (an unfold's output size)."""
    sizes, side = [], img_size
    for kernel, stride, padding in splits:
        side = (side + 2 * padding - kernel) // stride + 1
        sizes.append(side)
    return sizes


def splits_stride(splits) -> int:
    return math.prod(stride for _, stride, _ in splits)


class T2TAttention(nn.Module):
    """One head from width `dim` to `out_dim`; scaled by dim^-0.5 as the reference code (the input width)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.out_dim, self.scale = out_dim, dim ** -0.5
        self.qkv = nn.Linear(dim, out_dim * 3, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return v + self.proj(F.scaled_dot_product_attention(q, k, v, scale=self.scale))


class T2TLayer(nn.Module):
    """The re-structurization step: attention (residual from v), then an MLP of ratio 1 with its residual."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = T2TAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TTokens(nn.Module):
    """The Tokens-to-Token module, in the place of timm's PatchEmbed: (B, C, H, W) -> (B, N, embed_dim)."""
    masks_pixels = True

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 splits=PAPER_SPLITS, token_dim: int = 64, **_timm_kwargs):
        super().__init__()
        splits = [tuple(s) for s in splits]
        self.sizes = split_sizes(img_size, splits)
        stride = splits_stride(splits)
        if patch_size != stride or self.sizes[-1] * stride != img_size:
            raise ValueError(f"soft splits {splits} on {img_size} px give a {self.sizes[-1]}x{self.sizes[-1]} grid: "
                             f"not {img_size} px / the total stride {stride} (patch size {patch_size})")
        self.img_size, self.patch_size = (img_size, img_size), (stride, stride)
        self.grid_size = (self.sizes[-1], self.sizes[-1])
        self.num_patches = self.sizes[-1] ** 2
        widths = [in_chans * splits[0][0] ** 2] + [token_dim * k * k for k, _, _ in splits[1:]]
        for i, (kernel, stride, padding) in enumerate(splits):
            self.add_module(f"soft_split{i}", nn.Unfold(kernel, stride=stride, padding=padding))
            if i:
                self.add_module(f"attention{i}", T2TLayer(widths[i - 1], token_dim))
        self.project = nn.Linear(widths[-1], embed_dim)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is not None:
            visible = ~token_mask_to_pixels(hidden, self.grid_size, self.patch_size[0])
            x = torch.where(visible, x, 0.0)
        x = self.soft_split0(x).transpose(1, 2)
        for i, side in enumerate(self.sizes[:-1], start=1):
            x = getattr(self, f"attention{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # tokens back on their grid
            x = getattr(self, f"soft_split{i}")(x).transpose(1, 2)
        return self.project(x)


def t2t_encoder(size: str, img_size: int, in_chans: int = 3, num_classes: int = 0, pos_embed: str = "sincos",
                splits=PAPER_SPLITS, token_dim: int = 64, **timm_kwargs) -> ViTEncoder:
    """T2T-ViT of a named size (T2T_SIZES) with the soft splits `splits` ((kernel, stride, padding) each)."""
    if size not in T2T_SIZES:
        raise ValueError(f"unknown T2T-ViT size {size!r}; choose one of {', '.join(T2T_SIZES)}")
    width, depth, heads, mlp_ratio = T2T_SIZES[size]
    return build_vit(img_size=img_size, patch_size=splits_stride(splits), in_chans=in_chans, num_classes=num_classes,
                     embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=False,
                     pos_embed=pos_embed, embed_layer=partial(T2TTokens, splits=splits, token_dim=token_dim),
                     **timm_kwargs)
