"""Reconstruction grids: predictions mapped back to pixels (norm-pix with the visible patches' statistics)."""
from __future__ import annotations

import torch

from conftest import SAMPLE_DATA, small_model
from mpp.data import normalizer, preview_images
from mpp.models.masking import make_mask
from mpp.models.patches import patchify
from mpp.models.targets import PixelTarget
from mpp.visualize import reconstruction_grid

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def real_images(count=4, size=32):
    shard = sorted(SAMPLE_DATA.glob("val-*.tar*"))[0]
    return normalizer(MEAN, STD, torch.device("cpu"))(preview_images(str(shard), size, count))


def test_visible_patches_map_back_exactly_from_their_true_target():
    target = PixelTarget(4, 3, norm_pix=True)
    imgs = real_images()
    visible = ~make_mask("random", imgs.shape[0], (8, 8), 0.75).masked
    pixels = target.to_pixels(target(imgs), imgs, visible)
    assert torch.allclose(pixels[visible], patchify(imgs, 4)[visible], atol=1e-4)
    # A masked patch only gets its neighbours' statistics, so it is not recovered exactly.
    assert not torch.allclose(pixels[~visible], patchify(imgs, 4)[~visible], atol=1e-2)


def test_masked_patches_take_the_statistics_of_nearby_visible_patches():
    # Left half dark, right half bright: a masked patch must take its own side's brightness,
    # which an image-wide average of the visible patches would not give.
    imgs = torch.zeros(1, 3, 16, 16)
    imgs[..., 8:] = 1.0
    imgs += 0.1 * torch.randn_like(imgs)
    visible = torch.zeros(1, 16, dtype=torch.bool)
    visible[0, [0, 3, 12, 15]] = True  # the four corners (two dark, two bright)
    zero_pred = torch.zeros(1, 16, 48)  # predicted structure 0: the mapped patch is its estimated mean
    pixels = PixelTarget(4, 3, norm_pix=True).to_pixels(zero_pred, imgs, visible)
    means = pixels.mean(-1).view(4, 4)
    # An image-wide average would put every masked patch at 0.5.
    assert means[:, :2].max() < 0.4 and means[:, 2:].min() > 0.6


def test_grid_has_four_columns_per_image_in_unit_range():
    model = small_model()
    grid = reconstruction_grid(model, real_images(count=3), MEAN, STD)
    assert grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert grid.shape[2] > grid.shape[1]  # 4 columns wide, 3 rows high
    # Same seed, same masks: the grid is reproducible without touching the global RNG.
    state = torch.get_rng_state()
    assert torch.equal(grid, reconstruction_grid(model, real_images(count=3), MEAN, STD))
    assert torch.equal(state, torch.get_rng_state())


def test_grids_of_every_pixel_mapping_target_and_none_for_hog():
    imgs = real_images(count=2)
    for overrides in (["objective=simmim", "target.loss=l1", "target.norm_pix=false", "mask.unit=2"],
                      ["objective=vit_mpp", "target.kind=mean_color", "mask.ratio=0.5"]):
        grid = reconstruction_grid(small_model(*overrides), imgs, MEAN, STD)
        assert grid is not None and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert reconstruction_grid(small_model("target.kind=hog"), imgs, MEAN, STD) is None
