"""Masked autoencoder (He et al., 2021) around a timm ViT encoder.

The encoder sees only the visible patches; a light decoder gets them back with mask
tokens at the masked positions and predicts every patch's pixels; the loss is the MSE
on masked patches, optionally against per-patch normalised pixels ("norm-pix").

`uniformity` > 0 adds U-MAE's regulariser (Zhang et al., 2022, "How Mask Matters"): the mean squared
cosine similarity between the batch's images, each the mean of its visible patch tokens at the encoder's
output, which U-MAE adds against the dimensional collapse of MAE's features; one B x B matmul. On
CIFAR-10 it lifted kNN accuracy, not the linear probe (README, quality benchmark).
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import LayerNorm  # eps 1e-6, as timm's ViT and MAE use
from timm.models.vision_transformer import Block

from .vit import sincos_pos_embed, vit_encoder


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in raster order, pixels as (row, col, channel)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], c: int = 3) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, (h, w) = x.shape[0], grid
    x = x.reshape(b, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h * p, w * p)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    return round(num_patches * (1 - mask_ratio))


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None, generator=None):
    """Per-sample uniform masking by argsort of noise (MAE).

    Returns ids_keep (B, K) of the visible patches, mask (B, N) with 1 = masked, and
    ids_restore (B, N) that puts [visible..., masked...] back into raster order.
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = (ids_restore >= keep).float()
    return ids_shuffle[:, :keep], mask, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MAE(nn.Module):
    def __init__(
        self,
        encoder: str = "base",
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        uniformity: float = 0.0,
    ):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = vit_encoder(encoder, img_size, patch_size, in_chans)
        self.patch_size, self.in_chans = patch_size, in_chans
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        if uniformity < 0:
            raise ValueError(f"uniformity must be >= 0, got {uniformity}")
        self.uniformity = uniformity
        if num_visible(self.num_patches, mask_ratio) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {self.num_patches}")

        width = self.encoder.embed_dim
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(self.grid, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        self._init_weights()

    def _init_weights(self):
        # MAE's initialisation: xavier for linear layers and the patch projection (as if linear).
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names timm's optimizer factory keeps out of weight decay (norms and biases it finds itself)."""
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x = gather_tokens(x, ids_keep)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], dim=1))
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n = x.shape[0], ids_restore.shape[1]
        masked = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        patches = gather_tokens(torch.cat([x[:, 1:], masked], dim=1), ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        per_patch = (pred.float() - self.target(imgs)).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @staticmethod
    def uniformity_loss(latent: torch.Tensor) -> torch.Tensor:
        """U-MAE's regulariser: mean over all pairs (i, j) of the batch of cos(f_i, f_j)^2, f = the mean
        patch token (the feature the probe reads). 1 when all images collapse to one direction; at best
        max(1/B, 1/width), for features spread evenly over as many directions as there can be."""
        f = nn.functional.normalize(latent[:, 1:].float().mean(dim=1), dim=-1)
        return (f @ f.T).pow(2).mean()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        """Returns (loss, pred (B, N, p*p*C), mask (B, N) with 1 = masked)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, ratio, imgs.device)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.loss(imgs, pred, mask)
        if self.uniformity:
            loss = loss + self.uniformity * self.uniformity_loss(latent)
        return loss, pred, mask
