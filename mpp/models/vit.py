"""ViT encoder: timm's own `VisionTransformer`, with fixed 2-D sin-cos or learned position embeddings.

Subclassing timm's class (not copying its blocks) makes the encoder's state dict *be* a timm state
dict: export is a key filter and fine-tuning loads it with no renaming. The subclass adds no weights,
only the steps a masked objective takes apart (the tokenizer contract every encoder keeps):
- `embed(imgs, hidden)`: the patch tokens (B, N, D), without positions. `hidden` (B, N) marks tokens whose
  pixels must not reach the encoder's output; a tokenizer whose tokens mix neighbouring pixels masks them
  itself, here every token sees its own patch only, so the objective drops or replaces them;
- `add_positions(tokens)`, `with_prefix(tokens)`: the position embedding, then the class token;
- `grid` and `patch_size`: the token grid and the pixels per token side.
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
POS_EMBEDS = ("sincos", "learned")


def sincos_pos_embed(grid: tuple[int, int], dim: int, class_token: bool = True) -> torch.Tensor:
    """(1, [1 +] H*W, dim) fixed 2-D sin-cos embedding; the class token's row is zero (as in MAE)."""
    emb = build_sincos2d_pos_embed(list(grid), dim=dim)
    if class_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb])
    return emb.unsqueeze(0)


class ViTEncoder(VisionTransformer):
    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def width(self) -> int:
        return self.embed_dim

    def embed(self, imgs: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.patch_embed(imgs)

    def add_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.pos_embed[:, self.num_prefix_tokens:]

    def with_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)


def vit_encoder(size: str, img_size: int, patch_size: int, in_chans: int = 3, num_classes: int = 0,
                pos_embed: str = "sincos", **timm_kwargs) -> ViTEncoder:
    """A timm ViT of a named size, headless unless given num_classes. Its position embedding is fixed sin-cos
    (MAE) or learned (the ViT paper); fine-tuning makes a sin-cos one trainable from there."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"unknown position embedding {pos_embed!r}; choose one of {', '.join(POS_EMBEDS)}")
    width, depth, heads = VIT_SIZES[size]
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
    vit = ViTEncoder(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=width, depth=depth, num_heads=heads, **timm_kwargs,
    )
    if pos_embed == "sincos":
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_pos_embed(vit.patch_embed.grid_size, width))
        vit.pos_embed.requires_grad_(False)
    return vit


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """Choose between torch's fused attention kernel and timm's explicit q@k, softmax, @v path (on CPUs the
    explicit path trains faster; README, "Performance")."""
    from timm.layers import Attention
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = enabled
