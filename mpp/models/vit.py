"""ViT encoder: timm's own `VisionTransformer`, with fixed 2-D sin-cos or learned position embeddings.

Subclassing timm's class (not copying its blocks) makes the encoder's state dict *be* a timm state
dict: export is a key filter and fine-tuning loads it with no renaming. The subclass adds no weights,
only the steps a masked objective takes apart (the tokenizer contract every encoder keeps):
- `embed(imgs, hidden)`: the tokens (B, N, D), without positions. `hidden` (B, N) marks tokens whose
  pixels must not reach the encoder's output. The patch tokenizer (timm's PatchEmbed) gives every token its
  own patch only, so the objective drops or replaces the hidden ones; a tokenizer whose tokens mix
  neighbouring pixels (hybrid.py, t2t.py: `masks_pixels`) keeps the hidden pixels out itself;
- `add_positions(tokens)`, `with_prefix(tokens)`: the position embedding, then the class token;
- `encode(tokens)`: tokens with their positions through the class token, the blocks and the final norm;
- `grid` and `patch_size`: the token grid and the pixels per token side (the tokenizer's total stride);

and the two steps every encoder kind offers (vt.py's VT-ResNet too):
- `masked_grid(imgs, hidden, mask_token)`: (B, N, width) the output at every grid position for an image
  whose hidden tokens are replaced by `mask_token` (SimMIM's objective);
- `pooled_features(x, pool, blocks)`: the frozen encoder's feature of an image (probe, kNN).
"""
from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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
        return self.patch_embed.img_size[0] // self.patch_embed.grid_size[0]

    @property
    def width(self) -> int:
        return self.embed_dim

    def embed(self, imgs: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(self.patch_embed, "masks_pixels", False):
            return self.patch_embed(imgs, hidden)
        return self.patch_embed(imgs)

    def add_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.pos_embed[:, self.num_prefix_tokens:]

    def with_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def masked_grid(self, imgs: torch.Tensor, hidden: torch.Tensor, mask_token: torch.Tensor,
                    fusion: nn.Module | None = None) -> torch.Tensor:
        """(B, N, width): the final norm's output at every token for an image whose `hidden` (B, N) tokens are
        replaced in place by `mask_token` (1, 1, width) before the position embedding; `fusion` (fusion.py), if
        given, runs the blocks."""
        tokens = self.embed(imgs, hidden)
        tokens = torch.where(hidden.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        return self.encode(self.add_positions(tokens), fusion)[:, self.num_prefix_tokens:]

    def encode(self, tokens: torch.Tensor, fusion: nn.Module | None = None) -> torch.Tensor:
        """Tokens with their positions -> the output, class token first: the blocks (run by `fusion` if given)
        and the final norm."""
        x = self.with_prefix(tokens)
        if fusion is not None:
            x = fusion(self.blocks, x, checkpointed=self.grad_checkpointing)
        else:
            x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        return self.norm(x)

    def pooled_features(self, x: torch.Tensor, pool: str, blocks: int) -> torch.Tensor:
        """(B, blocks * width): per block, the class token (pool "cls") or the mean patch token (pool "mean")
        after the final norm, for the last `blocks` blocks, oldest first."""
        outputs = self.forward_intermediates(x, indices=blocks, norm=True, return_prefix_tokens=True,
                                             output_fmt="NLC", intermediates_only=True)
        return torch.cat([prefix[:, 0] if pool == "cls" else tokens.mean(1) for tokens, prefix in outputs], dim=1)


def vit_encoder(size: str, img_size: int, patch_size: int, in_chans: int = 3, num_classes: int = 0,
                pos_embed: str = "sincos", **timm_kwargs) -> ViTEncoder:
    """A timm ViT of a named size, headless unless given num_classes. Its position embedding is fixed sin-cos
    (MAE) or learned (the ViT paper); fine-tuning makes a sin-cos one trainable from there."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    width, depth, heads = VIT_SIZES[size]
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
    return build_vit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                     embed_dim=width, depth=depth, num_heads=heads, pos_embed=pos_embed, **timm_kwargs)


def build_vit(pos_embed: str = "sincos", **timm_kwargs) -> ViTEncoder:
    """A ViTEncoder of timm's keyword arguments (embed_layer: the tokenizer), its position embedding fixed
    sin-cos or learned."""
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"unknown position embedding {pos_embed!r}; choose one of {', '.join(POS_EMBEDS)}")
    vit = ViTEncoder(**timm_kwargs)
    width = vit.embed_dim
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
