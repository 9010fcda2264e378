"""Which tokens an objective hides: mask generators on the token grid, and the mask ratio over a run.

Every generator returns a `Mask` with exactly round(ratio x units) masked units per image (a unit is a
square of `unit` x `unit` tokens), so every image of a batch keeps the same number of tokens and MAE can
drop the masked ones as one tensor.

- random (MAE): each image's units ranked by uniform noise, the first ones kept.
- block (BEiT): random rectangles of units, area uniform in [min_block, remaining], aspect ratio
  log-uniform in [0.3, 1/0.3], each accepted if it masks 1 ... remaining new units; the count is then
  topped up with random units where rectangles could not fill it exactly.
- unit > 1 (SimMIM's 32-px mask units on patch 16: unit 2): either kind drawn on the coarser grid of units,
  each unit then covering unit x unit tokens.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Mask(NamedTuple):
    """masked (B, N) bool, True = hidden; ids_keep (B, K) the visible tokens; ids_restore (B, N) the order that
    puts [visible tokens..., masked tokens...] back into raster order."""
    masked: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor

    @classmethod
    def from_order(cls, ids_shuffle: torch.Tensor, keep: int) -> "Mask":
        """The mask that keeps the first `keep` tokens of each row of `ids_shuffle` (a permutation per row)."""
        ids_restore = ids_shuffle.argsort(dim=1)
        return cls(ids_restore >= keep, ids_shuffle[:, :keep], ids_restore)

    @classmethod
    def from_bool(cls, masked: torch.Tensor, keep: int) -> "Mask":
        """From a (B, N) bool mask with `keep` visible tokens in every row; they are kept in raster order."""
        return cls.from_order(masked.to(torch.uint8).argsort(dim=1, stable=True), keep)


def num_masked(units: int, ratio: float) -> int:
    return units - round(units * (1 - ratio))


def random_units(batch: int, units: int, count: int, device=None, generator=None) -> torch.Tensor:
    """(B, units) noise ranks: a unit is masked where its rank is >= units - count (MAE's argsort of noise)."""
    noise = torch.rand(batch, units, device=device, generator=generator)
    return noise.argsort(dim=1)


MIN_ASPECT = 0.3
BLOCK_ROUNDS = 64  # rectangles tried per image before the count is topped up at random


@torch.compiler.disable  # a loop with a data-dependent exit: eager, outside a compiled model's graph
def block_units(batch: int, grid: tuple[int, int], count: int, min_block: int = 16, device=None,
                generator=None) -> torch.Tensor:
    """(B, h*w) bool: BEiT's block-wise masking with exactly `count` masked units per image.

    All images draw one rectangle per round, together (BEiT draws per image in Python, which costs
    milliseconds per image); an image stops accepting once it holds `count`."""
    h, w = grid
    masked = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
    for _ in range(BLOCK_ROUNDS):
        remaining = count - masked.flatten(1).sum(1)
        if not (remaining > 0).any():
            break
        u = torch.rand(batch, 4, device=device, generator=generator)
        area = min_block + (remaining.float() - min_block) * u[:, 0]
        aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[:, 1])
        bh = torch.sqrt(area * aspect).round().long()
        bw = torch.sqrt(area / aspect).round().long()
        fits = (bh < h) & (bw < w) & (bh > 0) & (bw > 0)
        top = (u[:, 2] * (h - bh + 1).clamp(min=1)).long()
        left = (u[:, 3] * (w - bw + 1).clamp(min=1)).long()
        rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + bh).view(-1, 1, 1))
                & (cols >= left.view(-1, 1, 1)) & (cols < (left + bw).view(-1, 1, 1)))
        new = (rect & ~masked).flatten(1).sum(1)
        accept = fits & (new > 0) & (new <= remaining)
        masked |= rect & accept.view(-1, 1, 1)
    return top_up(masked.flatten(1), count, generator)


def top_up(masked: torch.Tensor, count: int, generator=None) -> torch.Tensor:
    """Mask random further units of each row until it holds `count` (rows never hold more)."""
    noise = torch.rand(masked.shape, device=masked.device, generator=generator)
    # Masked units first, then the others in random order; the first `count` are masked.
    order = (noise - masked.float()).argsort(dim=1)
    return torch.zeros_like(masked).scatter_(1, order[:, :count], True)


def expand_units(masked_units: torch.Tensor, units_grid: tuple[int, int], unit: int) -> torch.Tensor:
    """(B, units) bool on the grid of units -> (B, N) bool on the token grid."""
    b, (h, w) = masked_units.shape[0], units_grid
    grid = masked_units.view(b, h, 1, w, 1).expand(b, h, unit, w, unit)
    return grid.reshape(b, h * unit * w * unit)


def make_mask(kind: str, batch: int, grid: tuple[int, int], ratio: float, unit: int = 1, min_block: int = 16,
              device=None, generator=None) -> Mask:
    units_grid = (grid[0] // unit, grid[1] // unit)
    units = units_grid[0] * units_grid[1]
    count = num_masked(units, ratio)
    if kind == "random" and unit == 1:  # MAE's own draw: the noise order is the shuffle
        return Mask.from_order(random_units(batch, units, count, device, generator), units - count)
    if kind == "random":
        order = random_units(batch, units, count, device, generator)
        masked_units = order.argsort(dim=1) >= units - count
    elif kind == "block":
        masked_units = block_units(batch, units_grid, count, min_block, device, generator)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {sorted(MASK_KINDS)}")
    return Mask.from_bool(expand_units(masked_units, units_grid, unit), (units - count) * unit * unit)


MASK_KINDS = ("random", "block")


def ratio_at(ratio: float, ratio_end: float | None, schedule: str, progress: float) -> float:
    """The mask ratio at `progress` (step / total steps, 0 ... 1): constant, or from `ratio` to `ratio_end`
    linearly or along a half cosine. A function of the step alone, so a resumed run masks as the
    uninterrupted one."""
    if schedule == "constant" or ratio_end is None:
        return ratio
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return ratio + (ratio_end - ratio) * progress
    if schedule == "cosine":
        return ratio_end + (ratio - ratio_end) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown mask schedule {schedule!r}; choose constant, linear or cosine")
