"""Images as rows of patches, and tokens picked by index: the shapes every objective and target share."""
from __future__ import annotations

import torch


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


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, K) indices -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def token_mask_to_pixels(masked: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, N) bool on the token grid -> (B, 1, H, W) bool in pixel space."""
    b, (h, w) = masked.shape[0], grid
    return masked.view(b, 1, h, 1, w, 1).expand(b, 1, h, patch_size, w, patch_size).reshape(
        b, 1, h * patch_size, w * patch_size)
