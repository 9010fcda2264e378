"""Reconstruction grids: original | masked | reconstruction | reconstruction with visible patches pasted."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from .models.patches import patchify, unpatchify


@torch.no_grad()
def masked_forward(model, imgs: torch.Tensor, seed: int = 0):
    """The model's output (ModelOutput) in eval mode with the masks that `seed` draws, leaving the global RNG and
    the model's mode as they were: the same masks on every call."""
    was_training = model.training
    model.eval()
    fork = [imgs.device] if imgs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        out = model(imgs)
    model.train(was_training)
    return out


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, mean, std, seed: int = 0) -> torch.Tensor | None:
    """(3, H', W') image in [0, 1]: one row per input image, four columns; None when the model's target has no
    map back to pixels (HOG)."""
    out = masked_forward(model, imgs, seed)
    pred = model.target.to_pixels(out.pred.float(), imgs, ~out.hidden)
    if pred is None:
        return None
    p, grid = model.patch_size, model.grid
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    original = (imgs * std_t + mean_t).clamp(0, 1)
    recon = (unpatchify(pred, p, grid, imgs.shape[1]) * std_t + mean_t).clamp(0, 1)
    keep = (~out.hidden).unsqueeze(-1).float()
    shown = lambda visible, hidden: unpatchify(patchify(visible, p) * keep + hidden * (1 - keep), p, grid,
                                               imgs.shape[1])
    columns = [original, shown(original, 0.5), recon, shown(original, patchify(recon, p))]  # hidden: grey
    columns = torch.stack(columns, dim=1).flatten(0, 1)
    if columns.shape[-1] < 96:  # small images: enlarge (nearest, so patches stay sharp) to be seen at all
        columns = torch.nn.functional.interpolate(columns, scale_factor=96 // columns.shape[-1] + 1, mode="nearest")
    return make_grid(columns.cpu(), nrow=4, padding=2, pad_value=1.0)


def save_reconstruction(model, imgs, mean, std, path: str | Path, seed: int = 0) -> Path | None:
    """Write the grid to `path`; None (nothing written) when the model's target has no pixels to show."""
    grid = reconstruction_grid(model, imgs, mean, std, seed)
    if grid is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
