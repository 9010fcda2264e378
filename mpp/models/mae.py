"""Masked autoencoder (He et al., 2021).

The encoder sees only the visible tokens (no mask tokens: about 3x cheaper than encoding the whole
image at 75% masking); a light transformer decoder gets them back with a learned mask token at every
masked position, its own fixed sin-cos positions, and predicts every patch's target; the loss counts
the masked patches only.
"""
from __future__ import annotations

import torch
from timm.layers import LayerNorm  # eps 1e-6, as timm's ViT and MAE use
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from .masking import Mask
from .model import MaskedImageModel, Prediction
from .patches import gather_tokens
from .vit import sincos_pos_embed


class MAEDecoder(nn.Module):
    def __init__(self, width: int, grid: tuple[int, int], target_dim: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(grid, dim), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm)
                                      for _ in range(depth)])
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, target_dim)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """As timm's models: recompute the blocks' activations in the backward pass."""
        self.grad_checkpointing = enable

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, width): class token then the visible tokens -> (B, N, target dim)."""
        x = self.embed(latent)
        b, n = x.shape[0], ids_restore.shape[1]
        masked = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        patches = gather_tokens(torch.cat([x[:, 1:], masked], dim=1), ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = self.norm(checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x))
        return self.pred(x[:, 1:])


class MAE(MaskedImageModel):
    def build_head(self, cfg, target_dim: int) -> nn.Module:
        d = cfg.decoder
        return MAEDecoder(self.encoder.width, self.encoder.grid, target_dim, d.dim, d.depth, d.heads)

    def predict(self, imgs: torch.Tensor, mask: Mask) -> Prediction:
        enc = self.encoder
        tokens = enc.add_positions(enc.embed(imgs, mask.masked))
        latent = self.encode(gather_tokens(tokens, mask.ids_keep))
        pred = self.head(latent, mask.ids_restore)
        features = latent[:, enc.num_prefix_tokens:].mean(dim=1)
        return Prediction(pred, hidden=mask.masked, scored=mask.masked, features=features)
