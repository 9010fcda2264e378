"""Masked autoencoder (He et al., 2021) around a timm ViT encoder.

The encoder sees only the visible patches; a light decoder gets them back with mask
tokens at the masked positions and predicts every patch's pixels; the loss is the MSE
on masked patches, optionally against per-patch normalised pixels ("norm-pix").

`uniformity` > 0 adds U-MAE's regulariser (Zhang et al., 2022, "How Mask Matters"): the mean squared
cosine similarity between the batch's images, each the mean of its visible patch tokens at the encoder's
output, which U-MAE adds against the dimensional collapse of MAE's features; one B x B matmul. On
CIFAR-10 it lifted kNN accuracy, not the linear probe (README, quality benchmark).

`contrastive` > 0 adds a SimCLR term (Chen et al., 2020), as CAN (Mishra et al., 2022) pairs it with MAE:
each image gets a second view (`views.random_view`: crop, flip, colour distortion, made on the device),
both views are masked and reconstructed in one pass of twice the batch, and an MLP head on each view's
mean visible patch token is trained by NT-Xent to pick its twin among the 2B views. Each step costs
about 1.7x a plain one on a CPU (README).

`fuse_blocks` (MFF: Liu et al., 2023, "Improving Pixel-based MIM by Reducing Wasted Modeling Capability")
gives the decoder a learned, softmax-weighted sum of the last block's output and those of earlier blocks (each
through its own linear layer) instead of the last block's alone, so that the low-level detail pixel targets ask
for can come from shallow blocks and the deep ones are left for the image's content. On CIFAR-10 it lifted the
linear probe over plain MAE at both seeds tried (README). The fusion weights and layers are pretraining's
only, like the decoder.

Both terms compare the images of a micro-batch with each other; under DDP they see the micro-batches of
all processes (`batch_losses`), so a run scores the same pairs on one process or many.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import LayerNorm  # eps 1e-6, as timm's ViT and MAE use
from timm.models.vision_transformer import Block

from .batch_losses import contrastive_loss, uniformity_loss
from .views import random_view
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


# The contrastive term's head, SimCLR's MLP: width -> max(width, 512) -> 128 (its output size).
PROJECTOR_MIN_HIDDEN, PROJECTOR_DIM = 512, 128


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
        contrastive: float = 0.0,
        contrastive_temperature: float = 0.1,
        fuse_blocks: tuple[int, ...] = (),
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
        if contrastive < 0 or contrastive_temperature <= 0:
            raise ValueError(f"contrastive must be >= 0 and contrastive_temperature > 0, got {contrastive} and "
                             f"{contrastive_temperature}")
        self.contrastive, self.contrastive_temperature = contrastive, contrastive_temperature
        if num_visible(self.num_patches, mask_ratio) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {self.num_patches}")

        width, depth = self.encoder.embed_dim, len(self.encoder.blocks)
        self.fuse_blocks = sorted(set(int(i) for i in fuse_blocks))
        if any(not 0 <= i < depth - 1 for i in self.fuse_blocks):
            raise ValueError(f"fuse_blocks {list(fuse_blocks)}: give blocks 0 to {depth - 2} of the {depth}-block "
                             f"encoder (the last one, {depth - 1}, is always fused)")
        # One linear layer per fused earlier block; a weight per fused block, the last block's included.
        self.fusion_proj = nn.ModuleList(nn.Linear(width, width) for _ in self.fuse_blocks)
        self.fusion_weights = nn.Parameter(torch.ones(len(self.fuse_blocks) + 1)) if self.fuse_blocks else None
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(self.grid, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        # Only pretraining uses the projection head; probes, fine-tuning and exports read the encoder.
        hidden = max(width, PROJECTOR_MIN_HIDDEN)
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                       nn.Linear(hidden, PROJECTOR_DIM)) if contrastive else None
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
        x = torch.cat([cls, x], dim=1)
        if not self.fuse_blocks:
            return enc.norm(enc.blocks(x))
        fused = []
        for i, block in enumerate(enc.blocks):
            x = block(x)
            if i in self.fuse_blocks:
                fused.append(self.fusion_proj[len(fused)](x))
        weights = self.fusion_weights.softmax(0)
        return enc.norm(sum(w * f for w, f in zip(weights, fused + [x])))

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

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, return_terms: bool = False):
        """Returns (loss, pred (B, N, p*p*C), mask (B, N) with 1 = masked), and with `return_terms` the
        loss's unweighted terms by name, for logging. In training with the contrastive term on, pred and
        mask cover both views, (2B, ...), the second half being `random_view`'s."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        # The batch terms are training's only (they gather across processes under DDP, and a preview
        # runs on one process).
        contrast, uniform = self.training and self.contrastive > 0, self.training and self.uniformity > 0
        if contrast:
            imgs = torch.cat([imgs, random_view(imgs)])
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, ratio, imgs.device)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        terms = {"reconstruction": self.loss(imgs, pred, mask)}
        loss = terms["reconstruction"]
        # Each view's mean visible patch token at the encoder's output, the probe's feature (with fuse_blocks,
        # the fused output the decoder reads).
        pooled = latent[:, 1:].mean(dim=1)
        if uniform:
            terms["uniformity"] = uniformity_loss(pooled)
            loss = loss + self.uniformity * terms["uniformity"]
        if contrast:
            terms["contrastive"] = contrastive_loss(self.projector(pooled), self.contrastive_temperature)
            loss = loss + self.contrastive * terms["contrastive"]
        return (loss, pred, mask, terms) if return_terms else (loss, pred, mask)
