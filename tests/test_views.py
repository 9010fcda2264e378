"""The contrastive term's second view, made on the device: crops, flips and colour distortion of real images."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE_DATA
from mpp.config import IMAGENET_MEAN, IMAGENET_STD
from mpp.data import normalizer, preview_images
from mpp.data.shards import resolve_shards
from mpp.models.views import color_distort, crop_boxes, random_view, resized_crops



@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """16 real sample images, normalised, (16, 3, 32, 32) float32."""
    url = resolve_shards(str(SAMPLE_DATA), "val").urls[0]
    return normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu")(preview_images(url, 32, count=16))


def test_crop_boxes_follow_random_resized_crop_and_fit_the_image():
    scale, ratio = (0.25, 1.0), (3 / 4, 4 / 3)
    boxes = crop_boxes(4000, (32, 32), scale, ratio, generator=torch.Generator().manual_seed(0))
    index, x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(index, torch.arange(4000, dtype=torch.float32))
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 32 + 1e-4).all() and (y2 <= 32 + 1e-4).all()
    w, h = x2 - x1, y2 - y1
    area = w * h / 32 ** 2
    assert area.min() >= scale[0] - 1e-4 and area.max() <= 1 + 1e-4
    # Boxes that fit unclipped keep their aspect ratio within the range; the areas spread over it.
    assert ((w / h)[area < 0.5] >= ratio[0] - 1e-4).all() and ((w / h)[area < 0.5] <= ratio[1] + 1e-4).all()
    assert 0.55 < area.mean() < 0.65  # uniform over [0.25, 1] (0.625), a little lower where boxes are clipped
    # Each box's position is uniform over where it fits: offset / free space is uniform on [0, 1].
    for start, size in ((x1, w), (y1, h)):
        free = 32 - size
        u = (start / free)[free > 1]
        assert abs(u.mean() - 0.5) < 0.03 and abs(u.std() - 12 ** -0.5) < 0.03


def test_crop_is_a_bilinear_resize_of_the_box(images):
    # A box on whole pixels, 16 x 16 from (4, 8), upsampled 2x: inside, the bilinear samples equal
    # F.interpolate of the cut-out region (at the edges roi_align reads the neighbouring pixels instead).
    boxes = torch.tensor([[float(i), 4.0, 8.0, 20.0, 24.0] for i in range(len(images))])
    crops = resized_crops(images, boxes)
    reference = F.interpolate(images[:, :, 8:24, 4:20], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_view_without_crop_or_colour_is_the_image_or_its_mirror(images):
    view = random_view(images, scale=(1, 1), ratio=(1, 1), strength=0.0, gray_p=0.0,
                       generator=torch.Generator().manual_seed(0))
    same = (view - images).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (view - images.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert 3 <= mirrored.sum() <= 13  # flips with probability 1/2


def test_colour_distortion(images):
    gen = torch.Generator().manual_seed(0)
    grey = color_distort(images, 0.4, color_p=0.0, gray_p=1.0, generator=gen)
    assert torch.equal(grey, images.mean(dim=1, keepdim=True).expand_as(images))
    assert torch.equal(color_distort(images, 0.4, color_p=0.0, gray_p=0.0, generator=gen), images)
    # At full strength every image changes; contrast scales each channel's spread about its mean.
    distorted = color_distort(images, 0.4, color_p=1.0, gray_p=0.0, generator=gen)
    assert ((distorted - images).abs().amax(dim=(1, 2, 3)) > 0.05).all()
    ratio = distorted.std(dim=(2, 3)) / images.std(dim=(2, 3))
    assert ratio.min() > 0.3 and ratio.max() < 2.0 and ratio.std() > 0.05
    # Reproducible from the generator.
    again = color_distort(images, 0.4, color_p=1.0, gray_p=0.0, generator=torch.Generator().manual_seed(0))
    first = color_distort(images, 0.4, color_p=1.0, gray_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, first)



def test_contrastive_pretraining_run_hands_its_encoder_on(tmp_path):
    """A pretraining run with the contrastive term and fused blocks on the sample: it logs each term of its
    loss, and its checkpoint, projection head and fusion layers and all, loads into the probe's encoder with
    nothing left over, equal to the trained encoder."""
    from conftest import quick_config, read_metrics, run_train
    from mpp.models import frozen_encoder

    cfg = quick_config(tmp_path / "run", "train.steps=4", "log.every=2", "model.contrastive=0.5",
                       "model.fuse_blocks=[1,5]", "checkpoint.every=4")
    model = run_train(cfg)
    assert model.projector is not None and len(model.fusion.proj) == 2
    assert not torch.equal(model.fusion.weights.detach(), torch.ones(3))  # trained
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:  # each term logged beside the loss it makes up
        assert r["loss"] == pytest.approx(r["loss_reconstruction"] + 0.5 * r["loss_contrastive"], rel=1e-5)
        # NT-Xent over 64 views starts near log(63) = 4.1; the norm-pix reconstruction starts at 1-3.
        assert 2.5 < r["loss_contrastive"] < 4.5 and 0.3 < r["loss_reconstruction"] < 5.0
    vit, notes = frozen_encoder(cfg.model, str(tmp_path / "run"))
    trained = model.encoder.state_dict()
    assert set(vit.state_dict()) == set(trained)
    for key, value in vit.state_dict().items():
        assert torch.equal(value, trained[key]), key
