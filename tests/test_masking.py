"""Mask generators: exact counts, the restore order, unit alignment, block shapes, seeded determinism, and the
mask-ratio schedule."""
from __future__ import annotations

import math

import pytest
import torch

from mpp.models.masking import Mask, block_units, make_mask, num_masked, ratio_at
from mpp.models.patches import gather_tokens

MASK_CASES = [((8, 8), 0.75), ((14, 14), 0.75), ((4, 4), 0.5), ((2, 5), 0.75), ((7, 7), 0.9), ((1, 7), 0.3),
              ((16, 16), 0.6)]


def check_mask(mask: Mask, batch: int, n: int, masked_count: int):
    """The invariants every generator keeps: exact counts, ids_keep are the visible tokens, ids_restore inverts
    the [visible..., masked...] order."""
    keep = n - masked_count
    assert mask.masked.dtype == torch.bool and mask.masked.shape == mask.ids_restore.shape == (batch, n)
    assert mask.ids_keep.shape == (batch, keep)
    assert mask.masked.sum(1).tolist() == [masked_count] * batch
    for b in range(batch):
        assert sorted(mask.ids_keep[b].tolist()) == torch.nonzero(~mask.masked[b]).flatten().tolist()
        assert torch.equal(mask.ids_restore[b].sort().values, torch.arange(n))
    # The decoder's path: [visible tokens..., fillers...] gathered by ids_restore puts every visible token back at
    # its raster position and a filler at every masked one.
    raster = torch.arange(n).float().view(1, -1, 1).expand(batch, -1, 2)
    visible = gather_tokens(raster, mask.ids_keep)
    restored = gather_tokens(torch.cat([visible, torch.full((batch, n - keep, 2), -1.0)], 1), mask.ids_restore)[..., 0]
    assert torch.equal(restored, torch.where(mask.masked, torch.tensor(-1.0), raster[..., 0]))


@pytest.mark.parametrize("grid,ratio", MASK_CASES)
@pytest.mark.parametrize("kind", ["random", "block"])
def test_every_generator_masks_exactly_its_count(kind, grid, ratio):
    n = grid[0] * grid[1]
    mask = make_mask(kind, 6, grid, ratio, min_block=4, generator=torch.Generator().manual_seed(n))
    check_mask(mask, 6, n, num_masked(n, ratio))
    assert num_masked(n, ratio) == n - round(n * (1 - ratio))  # MAE's count of visible tokens: round(N (1 - r))


@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("grid,unit", [((8, 8), 2), ((14, 14), 2), ((12, 12), 3), ((8, 8), 4)])
def test_units_mask_whole_aligned_squares(kind, grid, unit):
    ratio, batch = 0.6, 5
    mask = make_mask(kind, batch, grid, ratio, unit=unit, min_block=2, generator=torch.Generator().manual_seed(unit))
    units = (grid[0] // unit) * (grid[1] // unit)
    check_mask(mask, batch, grid[0] * grid[1], num_masked(units, ratio) * unit * unit)
    blocks = mask.masked.view(batch, grid[0] // unit, unit, grid[1] // unit, unit)
    # Every unit x unit square aligned to the grid is all masked or all visible.
    per_square = blocks.sum(dim=(2, 4))
    assert set(per_square.unique().tolist()) <= {0, unit * unit}


def test_random_masks_differ_between_samples_and_calls_and_replay_with_a_seed():
    gen = torch.Generator().manual_seed(0)
    first = make_mask("random", 16, (8, 8), 0.75, generator=gen).masked
    assert len({tuple(row.tolist()) for row in first}) == 16
    assert not torch.equal(first, make_mask("random", 16, (8, 8), 0.75, generator=gen).masked)
    for kind in ("random", "block"):
        a = make_mask(kind, 8, (14, 14), 0.75, generator=torch.Generator().manual_seed(3))
        b = make_mask(kind, 8, (14, 14), 0.75, generator=torch.Generator().manual_seed(3))
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_random_masking_is_maes_argsort_of_noise():
    # MAE's draw: noise (B, N), ids_shuffle = argsort, keep the first round(N (1 - r)).
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(5))
    mask = make_mask("random", 4, (8, 8), 0.75, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask.ids_keep, noise.argsort(1)[:, :16])


def components(grid: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected groups of True cells of a 2-D bool grid."""
    h, w = grid.shape
    seen, sizes = torch.zeros_like(grid), []
    for r in range(h):
        for c in range(w):
            if grid[r, c] and not seen[r, c]:
                stack, size = [(r, c)], 0
                seen[r, c] = True
                while stack:
                    y, x = stack.pop()
                    size += 1
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and grid[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
                sizes.append(size)
    return sizes


def test_block_masking_draws_blocks_not_scattered_tokens():
    # BEiT's setting: 75 of 196 patches in rectangles of at least 16. Its masked tokens form a few large groups;
    # random masking's scatter into many small ones.
    gen = torch.Generator().manual_seed(0)
    blocks = block_units(32, (14, 14), 75, min_block=16, generator=gen).view(32, 14, 14)
    scattered = make_mask("random", 32, (14, 14), 75 / 196, generator=gen).masked.view(32, 14, 14)
    block_groups = [len(components(m)) for m in blocks]
    random_groups = [len(components(m)) for m in scattered]
    assert all(m.sum() == 75 for m in blocks)
    assert sum(block_groups) / 32 < 6 < sum(random_groups) / 32
    # Most masked tokens lie in groups of 16 or more (rectangles; the top-up adds a few single tokens).
    big = sum(sum(s for s in components(m) if s >= 16) for m in blocks)
    assert big / (32 * 75) > 0.8


def test_mask_ratio_schedule_is_a_function_of_the_step():
    assert ratio_at(0.75, None, "cosine", 0.3) == 0.75
    assert ratio_at(0.75, 0.5, "constant", 0.3) == 0.75
    assert ratio_at(0.5, 0.9, "linear", 0.0) == 0.5 and ratio_at(0.5, 0.9, "linear", 1.0) == pytest.approx(0.9)
    assert ratio_at(0.5, 0.9, "linear", 0.25) == pytest.approx(0.6)
    assert ratio_at(0.5, 0.9, "cosine", 0.0) == pytest.approx(0.5)
    assert ratio_at(0.5, 0.9, "cosine", 0.5) == pytest.approx(0.7)
    assert ratio_at(0.5, 0.9, "cosine", 1.0) == pytest.approx(0.9)
    assert ratio_at(0.5, 0.9, "cosine", 0.25) == pytest.approx(0.9 - 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="schedule"):
        ratio_at(0.5, 0.9, "step", 0.5)
