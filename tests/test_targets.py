"""Targets: patchify, the pixel loss (masked patches only, MAE's formula, L1), the ViT paper's mean colour classes,
MaskFeat's HOG."""
from __future__ import annotations

import math

import pytest
import torch

from mpp.config import IMAGENET_MEAN, IMAGENET_STD
from mpp.models.masking import make_mask
from mpp.models.patches import patchify, unpatchify
from mpp.models.targets import HogTarget, MeanColorTarget, PixelTarget


def patch_region(index: int, grid_w: int, p: int) -> tuple[slice, slice]:
    row, col = divmod(index, grid_w)
    return slice(row * p, (row + 1) * p), slice(col * p, (col + 1) * p)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the model's input (ImageNet mean/std)."""
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---- patchify ----

@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 3, 32, 48), 8), ((3, 1, 16, 8), 4), ((2, 3, 224, 224), 16)])
def test_patchify_round_trips_exactly(shape, p):
    b, c, h, w = shape
    imgs = torch.randn(*shape)
    patches = patchify(imgs, p)
    assert patches.shape == (b, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), c), imgs)


def test_patchify_orders_patches_in_raster_and_pixels_row_col_channel():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)  # grid 2 x 3
    for index in range(6):
        rows, cols = patch_region(index, 3, 8)
        expected = imgs[:, :, rows, cols].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(patches[:, index], expected)


# ---- pixels ----

@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_loss_sees_only_scored_patches(norm_pix):
    target = PixelTarget(4, 3, norm_pix)
    gen = torch.Generator().manual_seed(3)
    imgs = torch.randn(3, 3, 32, 32, generator=gen)
    pred = torch.randn(3, 64, 48, generator=gen)
    mask = make_mask("random", 3, (8, 8), 0.75, generator=gen).masked
    base = target.loss(pred, target(imgs), mask)

    sample = 1
    visible = torch.nonzero(~mask[sample]).flatten()
    masked = torch.nonzero(mask[sample]).flatten()
    assert len(visible) == 16 and len(masked) == 48
    # New random pixels (not a shift or scale: norm-pix would cancel those) in visible patches: same loss, bit for bit.
    changed = imgs.clone()
    for index in visible[:5].tolist():
        rows, cols = patch_region(index, 8, 4)
        changed[sample, :, rows, cols] = torch.randn(3, 4, 4, generator=gen) * 3
    assert torch.equal(target.loss(pred, target(changed), mask), base)
    # New pixels in one masked patch: the loss moves.
    changed = imgs.clone()
    rows, cols = patch_region(masked[0].item(), 8, 4)
    changed[sample, :, rows, cols] = torch.randn(3, 4, 4, generator=gen) * 3
    assert abs(target.loss(pred, target(changed), mask).item() - base.item()) > 1e-4
    # And predictions: only those of masked patches count.
    changed_pred = pred.clone()
    changed_pred[sample, visible] += 10.0
    assert torch.equal(target.loss(changed_pred, target(imgs), mask), base)
    changed_pred = pred.clone()
    changed_pred[sample, masked[0]] += 10.0
    assert target.loss(changed_pred, target(imgs), mask).item() > base.item()


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_pixel_loss_is_the_mean_error_over_masked_patches(norm_pix, kind):
    target = PixelTarget(4, 3, norm_pix, kind)
    gen = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, 32, 32, generator=gen)
    pred = torch.randn(2, 64, 48, generator=gen)
    mask = make_mask("random", 2, (8, 8), 0.75, generator=gen).masked
    # Independent reference: per patch, pixels (row, col, channel) of each 4x4 patch in raster order.
    reference = imgs.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(2, 64, 48)
    if norm_pix:
        reference = (reference - reference.mean(-1, keepdim=True)) / (reference.var(-1, keepdim=True) + 1e-6).sqrt()
    error = (pred - reference) ** 2 if kind == "l2" else (pred - reference).abs()
    torch.testing.assert_close(target.loss(pred, target(imgs), mask), error.mean(-1)[mask].mean(), rtol=1e-6,
                               atol=1e-6)


# ---- mean colour (the ViT paper's 3-bit classes) ----

def test_mean_colour_classes_of_hand_made_patches():
    target = MeanColorTarget(4, 3, IMAGENET_MEAN, IMAGENET_STD, bits=3)
    assert target.dim == 512
    colours = {  # (R, G, B) in [0, 1] -> class R*64 + G*8 + B of the 8 levels per channel
        (1.0, 0.0, 0.0): 7 * 64,      # pure red
        (0.0, 1.0, 0.0): 7 * 8,       # pure green
        (0.0, 0.0, 1.0): 7,           # pure blue
        (1.0, 1.0, 1.0): 511,         # white
        (0.0, 0.0, 0.0): 0,           # black
        (0.5, 0.26, 0.99): 4 * 64 + 2 * 8 + 7,
    }
    pixels = torch.zeros(1, 3, 4, 4 * len(colours))
    for i, colour in enumerate(colours):
        pixels[0, :, :, 4 * i:4 * i + 4] = torch.tensor(colour).view(3, 1, 1)
    labels = target(normalise(pixels))
    assert labels.tolist() == [list(colours.values())]
    # The mean over the patch decides: half black, half white -> level 4 of 8 in every channel.
    half = torch.zeros(1, 3, 4, 4)
    half[..., 2:] = 1.0
    assert target(normalise(half)).item() == 4 * 64 + 4 * 8 + 4
    # Quantising the normalised values instead would not give these classes: a mid-grey patch (0.5 in [0, 1])
    # is near 0 once normalised, level 0 if taken as a [0, 1] value.
    grey = torch.full((1, 3, 4, 4), 0.5)
    assert target(normalise(grey)).item() == 4 * 64 + 4 * 8 + 4


def test_mean_colour_loss_is_cross_entropy_over_scored_patches_and_maps_back_to_colours():
    target = MeanColorTarget(4, 3, IMAGENET_MEAN, IMAGENET_STD)
    gen = torch.Generator().manual_seed(0)
    imgs = normalise(torch.rand(2, 3, 8, 8, generator=gen))
    labels = target(imgs)
    logits = torch.randn(2, 4, 512, generator=gen)
    scored = torch.tensor([[True, False, True, False], [False, False, True, True]])
    expected = torch.nn.functional.cross_entropy(logits[scored], labels[scored])
    torch.testing.assert_close(target.loss(logits, labels, scored), expected)
    # A perfect prediction paints each patch the centre of its colour's bin: within 1/16 of its mean colour.
    perfect = torch.nn.functional.one_hot(labels, 512).float()
    pixels = target.to_pixels(perfect, imgs, ~scored)
    shown = unpatchify(pixels, 4, (2, 2)) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + \
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    means = torch.nn.functional.avg_pool2d(imgs * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
                                           + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), 4)
    assert (torch.nn.functional.avg_pool2d(shown, 4) - means).abs().max() <= 1 / 16 + 1e-5


# ---- HOG (MaskFeat) ----

def test_hog_of_a_vertical_edge_lands_in_its_orientation_bin():
    hog = HogTarget(16, 3, cell=8, bins=9)
    assert hog.dim == 108  # 2 x 2 cells x 9 bins x 3 channels, MaskFeat's size for patch 16
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[..., 16:] = 1.0  # dark left half, bright right: a vertical edge, horizontal gradient
    hist = hog.histograms(imgs)  # (1, 3, 9, 4, 4)
    at_edge = hist[0, :, :, :, 1:3]  # the cells either side of the edge
    # Gradient along x only: atan2(gx, 0) = +-pi/2, the middle of the unsigned range: bin 4 of 9.
    assert torch.all(at_edge.argmax(dim=1) == 4)
    torch.testing.assert_close(at_edge[:, 4], torch.ones_like(at_edge[:, 4]))  # all its weight, L2-normalised
    # A horizontal edge votes into bin 0 (atan2(0, gy) = 0 or pi).
    flipped = hog.histograms(imgs.transpose(2, 3))[0, :, :, 1:3, :]
    assert torch.all(flipped.argmax(dim=1) == 0)
    # Flat cells have no gradient: all bins 0.
    assert hist[0, :, :, :, 0].abs().max() == 0
    # Targets: per patch (channel, bin, cell row, cell column), in raster order of patches.
    targets = hog(imgs)
    assert targets.shape == (1, 4, 108)
    patch1 = targets[0, 1].view(3, 9, 2, 2)  # top-right patch: cells 2 and 3 of the top cell rows
    torch.testing.assert_close(patch1, hist[0, :, :, 0:2, 2:4])


def test_hog_cells_default_to_half_the_patch_and_must_divide_it():
    assert HogTarget(4, 3).cell == 2 and HogTarget(4, 3).dim == 2 * 2 * 9 * 3
    with pytest.raises(ValueError, match="does not divide"):
        HogTarget(4, 3, cell=3)


def test_hog_gaussian_window_weights_the_patch_centre():
    hog = HogTarget(16, 1, cell=8)
    w = hog.window
    assert w.shape == (16, 16) and math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)
    assert w[7, 7] == w.max() and w[0, 0] == w.min()
