"""ViT encoder: timm's own `VisionTransformer`, with fixed 2-D sin-cos position embeddings.

Using timm's class (not a copy of its blocks) makes the encoder's state dict *be* a timm
state dict: export is a key filter and fine-tuning loads it with no renaming.
"""
from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

# The ViT paper's sizes (width, depth, heads), plus DeiT's tiny/small.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def sincos_pos_embed(grid: tuple[int, int], dim: int, class_token: bool = True) -> torch.Tensor:
    """(1, [1 +] H*W, dim) fixed 2-D sin-cos embedding; the class token's row is zero (as in MAE)."""
    emb = build_sincos2d_pos_embed(list(grid), dim=dim)
    if class_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb])
    return emb.unsqueeze(0)


def vit_encoder(size: str, img_size: int, patch_size: int, in_chans: int = 3, num_classes: int = 0,
                **timm_kwargs) -> VisionTransformer:
    """A timm ViT of a named size whose position embedding is fixed sin-cos; headless unless given
    num_classes (fine-tuning, which also makes pos_embed trainable)."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    width, depth, heads = VIT_SIZES[size]
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
    vit = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=width, depth=depth, num_heads=heads, **timm_kwargs,
    )
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(vit.patch_embed.grid_size, width))
    vit.pos_embed.requires_grad_(False)
    return vit


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """Choose between torch's fused attention kernel and timm's explicit q@k, softmax, @v path.

    Measured on a 2-core CPU (README, "Performance"): the fused kernel's backward takes a third of
    a ViT-Tiny/4 MAE step, and the explicit path trains 50% faster there; on GPUs fused wins.
    """
    from timm.layers import Attention
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = enabled
