"""What an objective predicts for each scored patch, and the loss that compares.

A target is built for one patch size (the encoder's pixels per token) and knows:
- `dim`: values predicted per patch (pixels: p*p*C; mean colour: 2^(3 bits) classes; HOG: cells x bins x C);
- `__call__(imgs)`: the (B, N, ...) targets of a batch of model inputs (normalised images);
- `loss(pred, target, weight)`: the mean over the patches with weight 1 (the others count nothing);
- `to_pixels(pred, imgs, visible)`: the prediction as normalised pixels per patch, for previews, or None
  where no map back exists (HOG).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .patches import patchify


def weighted_mean(per_patch: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of (B, N) per-patch losses over the patches of weight 1."""
    weight = weight.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum()


class PixelTarget(nn.Module):
    """The patch's pixels, per-patch normalised with norm_pix (MAE), compared by L2 (MAE) or L1 (SimMIM)."""

    def __init__(self, patch_size: int, in_chans: int, norm_pix: bool = True, loss: str = "l2"):
        super().__init__()
        if loss not in ("l2", "l1"):
            raise ValueError(f"unknown pixel loss {loss!r}; choose l2 or l1")
        self.patch_size, self.norm_pix, self.kind = patch_size, norm_pix, loss
        self.dim = patch_size ** 2 * in_chans

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs.float(), self.patch_size)
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        diff = pred.float() - target
        per_patch = diff.pow(2).mean(dim=-1) if self.kind == "l2" else diff.abs().mean(dim=-1)
        return weighted_mean(per_patch, weight)

    def to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Norm-pix predictions carry no brightness or contrast of their own, and a hidden patch's true statistics
        are unknown at test time: each patch takes the mean and standard deviation of the visible patches around
        it, weighted by inverse squared grid distance (a visible patch: its own). An image-wide average instead
        paints every hidden patch the same flat colour."""
        if not self.norm_pix:
            return pred
        patches = patchify(imgs.float(), self.patch_size)
        stats = torch.cat([patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()], dim=-1)
        h, w = imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float().to(imgs.device)
        seen = visible.float()
        weights = seen.unsqueeze(1) / torch.cdist(coords, coords).pow(2).clamp(min=1e-6)  # (B, N, N)
        local = weights @ stats / weights.sum(-1, keepdim=True)
        mean, std = (seen.unsqueeze(-1) * stats + (1 - seen.unsqueeze(-1)) * local).unbind(-1)
        return pred * std.unsqueeze(-1) + mean.unsqueeze(-1)


class MeanColorTarget(nn.Module):
    """The ViT paper's masked patch prediction target: each channel's mean over the patch, quantised to 2^bits
    levels (3 bits: 8 levels, 512 colours), predicted as one class by cross-entropy.

    The colour is quantised from pixel values in [0, 1], recovered from the model's normalised input with the
    data's mean and std: quantising normalised values would put most patches in a few classes."""

    def __init__(self, patch_size: int, in_chans: int, mean, std, bits: int = 3):
        super().__init__()
        if not 1 <= bits <= 4:
            raise ValueError(f"mean-colour bits must be 1 to 4, got {bits}")
        self.patch_size, self.bits, self.in_chans = patch_size, bits, in_chans
        self.levels = 2 ** bits
        self.dim = self.levels ** in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("place", self.levels ** torch.arange(in_chans - 1, -1, -1), persistent=False)

    def colors(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, N, C) each patch's mean colour in [0, 1]."""
        pixels = (imgs.float() * self.std + self.mean).clamp(0, 1)
        p = self.patch_size
        return F.avg_pool2d(pixels, p).flatten(2).transpose(1, 2)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, N) class of each patch: levels per channel, the first channel most significant (R*64 + G*8 + B)."""
        level = (self.colors(imgs) * self.levels).floor().clamp(max=self.levels - 1).long()
        return (level * self.place).sum(-1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        per_patch = F.cross_entropy(pred.float().flatten(0, 1), target.flatten(), reduction="none")
        return weighted_mean(per_patch.view(target.shape), weight)

    def to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Each patch painted flat in the centre of its most likely colour class, normalised as the input."""
        level = (pred.argmax(-1, keepdim=True) // self.place) % self.levels  # (B, N, C)
        color = (level.float() + 0.5) / self.levels
        normalised = (color - self.mean.view(1, 1, -1)) / self.std.view(1, 1, -1)
        return normalised.repeat(1, 1, self.patch_size ** 2)  # patchify's (row, col, channel) order


class HogTarget(nn.Module):
    """MaskFeat's HOG target (SlowFast's HOGLayerC): per colour channel, Sobel gradients; each pixel's gradient
    magnitude, weighted by a Gaussian window the size of a patch, voted into `bins` unsigned orientation bins;
    summed over cells of `cell` x `cell` pixels; each cell L2-normalised over its bins. Per patch of 16 px with
    8-px cells: 2 x 2 cells x 9 bins x 3 channels = 108 values, compared by L2."""

    def __init__(self, patch_size: int, in_chans: int, cell: int | None = None, bins: int = 9):
        super().__init__()
        cell = cell or max(1, patch_size // 2)
        if patch_size % cell:
            raise ValueError(f"HOG cell {cell} px does not divide the patch size {patch_size}")
        self.patch_size, self.cell, self.bins, self.in_chans = patch_size, cell, bins, in_chans
        self.dim = (patch_size // cell) ** 2 * bins * in_chans
        sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("weight_x", sobel_x.view(1, 1, 3, 3).repeat(in_chans, 1, 1, 1), persistent=False)
        self.register_buffer("weight_y", sobel_x.T.reshape(1, 1, 3, 3).repeat(in_chans, 1, 1, 1), persistent=False)
        self.register_buffer("window", gaussian_window(patch_size, patch_size / 2), persistent=False)

    def histograms(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, bins, H / cell, W / cell) cell histograms, L2-normalised over the bins."""
        x = F.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.weight_x, groups=self.in_chans)
        gy = F.conv2d(x, self.weight_y, groups=self.in_chans)
        magnitude = torch.stack([gx, gy], dim=-1).norm(dim=-1)
        phase = torch.atan2(gx, gy) / math.pi * self.bins  # [-bins, bins]: unsigned once taken mod bins
        b, c, h, w = magnitude.shape
        tiles = (h // self.patch_size, w // self.patch_size)
        magnitude = magnitude * self.window.repeat(*tiles)
        votes = torch.zeros(b, c, self.bins, h, w, device=imgs.device)
        votes.scatter_add_(2, (phase.floor().long() % self.bins).unsqueeze(2), magnitude.unsqueeze(2))
        cells = F.avg_pool2d(votes.flatten(1, 2), self.cell) * self.cell ** 2  # sums over each cell
        return F.normalize(cells.view(b, c, self.bins, h // self.cell, w // self.cell), p=2, dim=2)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, N, dim): each patch's cells, as (channel, bin, cell row, cell column) per patch."""
        hist = self.histograms(imgs)
        b, c, k, h, w = hist.shape
        per_patch = self.patch_size // self.cell
        hist = hist.view(b, c, k, h // per_patch, per_patch, w // per_patch, per_patch)
        return hist.permute(0, 3, 5, 1, 2, 4, 6).reshape(b, (h // per_patch) * (w // per_patch), -1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weighted_mean((pred.float() - target).pow(2).mean(dim=-1), weight)

    def to_pixels(self, pred, imgs, visible):
        return None


def gaussian_window(size: int, std: float) -> torch.Tensor:
    """(size, size) Gaussian weights summing to 1, centred on the window (SlowFast's get_gkern)."""
    n = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-0.5 * ((n - n.mean()) / std) ** 2)
    window = g[:, None] * g[None, :]
    return window / window.sum()


TARGETS = ("pixels", "mean_color", "hog")


def build_target(cfg, patch_size: int, in_chans: int, mean, std) -> nn.Module:
    """The target of `cfg` (model.target) for patches of `patch_size` pixels."""
    if cfg.kind == "pixels":
        return PixelTarget(patch_size, in_chans, cfg.norm_pix, cfg.loss)
    if cfg.kind == "mean_color":
        return MeanColorTarget(patch_size, in_chans, mean, std, cfg.bits)
    if cfg.kind == "hog":
        return HogTarget(patch_size, in_chans, cfg.hog_cell, cfg.hog_bins)
    raise ValueError(f"unknown model.target.kind {cfg.kind!r}; choose one of {', '.join(TARGETS)}")
