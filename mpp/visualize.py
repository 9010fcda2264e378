"""Reconstruction grids: original | masked | reconstruction | reconstruction with visible patches pasted."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from .models.mae import patchify, unpatchify


def predictions_to_pixels(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                          grid: tuple[int, int], norm_pix: bool) -> torch.Tensor:
    """Map predicted patches back to the input's (normalised) pixel space.

    Norm-pix predictions carry no brightness or contrast of their own, and a masked patch's true
    statistics are unknown at test time. Each patch takes the mean and standard deviation of the
    *visible* patches around it, weighted by inverse squared grid distance (a visible patch: its
    own). An image-wide average instead paints every masked patch the same flat colour.
    """
    if not norm_pix:
        return pred
    patches = patchify(imgs, patch_size)
    stats = torch.cat([patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()], dim=-1)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float().to(imgs.device)
    weights = (1 - mask).unsqueeze(1) / torch.cdist(coords, coords).pow(2).clamp(min=1e-6)  # (B, N, N)
    local = weights @ stats / weights.sum(-1, keepdim=True)
    visible = (1 - mask).unsqueeze(-1)
    mean, std = (visible * stats + (1 - visible) * local).unbind(-1)
    return pred * std.unsqueeze(-1) + mean.unsqueeze(-1)


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, mean, std, seed: int = 0) -> torch.Tensor:
    """(3, H', W') image in [0, 1]: one row per input image, four columns."""
    was_training = model.training
    model.eval()
    devices = imgs.device
    fork = [devices] if devices.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):  # a fixed mask per call, without touching the run's RNG
        torch.manual_seed(seed)
        _, pred, mask = model(imgs)
    model.train(was_training)
    p, grid = model.patch_size, model.grid
    pred = predictions_to_pixels(pred.float(), imgs, mask, p, grid, model.norm_pix_loss)
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    original = (imgs * std_t + mean_t).clamp(0, 1)
    recon = (unpatchify(pred, p, grid) * std_t + mean_t).clamp(0, 1)
    keep = (1 - mask).unsqueeze(-1)
    shown = lambda visible, hidden: unpatchify(patchify(visible, p) * keep + hidden * (1 - keep), p, grid)
    columns = [original, shown(original, 0.5), recon, shown(original, patchify(recon, p))]  # masked: grey
    columns = torch.stack(columns, dim=1).flatten(0, 1)
    if columns.shape[-1] < 96:  # small images: enlarge (nearest, so patches stay sharp) to be seen at all
        columns = torch.nn.functional.interpolate(columns, scale_factor=96 // columns.shape[-1] + 1, mode="nearest")
    return make_grid(columns.cpu(), nrow=4, padding=2, pad_value=1.0)


def save_reconstruction(model, imgs, mean, std, path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(reconstruction_grid(model, imgs, mean, std, seed), path)
    return path
