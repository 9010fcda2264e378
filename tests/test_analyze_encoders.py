"""`python -m mpp.analyze` on every encoder kind (issue 20's tokenizers): VT's visual tokens' spatial attention,
the filters each kind shows first, and the figures of a checkpoint of each kind pretrained a few steps on the
shipped sample (the attention analyses on a hybrid's and a T2T-ViT's backbone tokens; those that do not apply
skipped with their reason).

The readings are checked against the papers' equations computed here from the modules' weights.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import QUICKSTART, quick_config, run_train, small_model
from test_analyze import analyze, read
from test_objectives import TOKENIZER_SETTINGS, sample_images
from test_tokenizers import PRETRAIN_SETTINGS
from mpp.analysis.embeddings import first_filters, standardized
from mpp.analysis.visual_tokens import spatial_softmaxes, token_maps

KINDS = ("patch", "hybrid", "t2t", "vt")
ATTENTION = ("attention_distance", "cls_attention")
# The figures each kind gets; the others' JSON says why not.
DRAWN = {kind: {"attention_distance", "pos_embed_similarity", "patch_filters", "reconstructions", "cls_attention"}
         for kind in ("patch", "hybrid", "t2t")}
DRAWN["vt"] = {"pos_embed_similarity", "patch_filters", "reconstructions", "vt_token_maps"}
ALL = set.union(*DRAWN.values())
DIAGONAL = 7 * 4 * math.sqrt(2)  # the farthest two token centres of an 8 x 8 grid 4 px apart


def vt_encoder():
    torch.manual_seed(0)
    return small_model(*TOKENIZER_SETTINGS["vt"], "objective=simmim").encoder.eval()


# ---- VT: each token's spatial attention ----

def test_vt_token_maps_are_each_tokenizers_softmax_over_the_map():
    encoder = vt_encoder()
    imgs = sample_images(3)
    with torch.no_grad():
        before = encoder.forward_features(imgs)
        maps = token_maps(encoder, imgs)
        after = encoder.forward_features(imgs)
        # The paper's equations from the weights: filter-based A = softmax_HW(X W_A), then, on the first
        # module's projected map and tokens, recurrent A = softmax_HW(X (T W_T->R)^T).
        x = encoder.feature_map(imgs) + encoder.pos_embed
        first, second = encoder.blocks
        expected = [(x @ first.tokenizer.W_A.weight.T).softmax(dim=1)]
        tokens, x = first(x, None)
        expected.append(torch.einsum("bnc,blc->bnl", x, tokens @ second.tokenizer.W_TR.weight.T).softmax(dim=1))
    assert torch.equal(before, after) and not any(m._forward_hooks for m in spatial_softmaxes(encoder))
    assert len(maps) == 2
    for found, reference in zip(maps, expected):
        assert found.shape == (3, 16, 8, 8)
        torch.testing.assert_close(found, reference.transpose(1, 2).reshape(3, 16, 8, 8))
        torch.testing.assert_close(found.sum((2, 3)), torch.ones(3, 16))
    assert spatial_softmaxes(small_model().encoder) is None
    with pytest.raises(ValueError, match="no VT modules"):
        token_maps(small_model().encoder, imgs)


# ---- the filters each kind reads pixels with ----

def test_hybrid_filters_are_its_stem_convolution_as_weight_standardised():
    torch.manual_seed(0)
    encoder = small_model(*TOKENIZER_SETTINGS["hybrid"]).encoder
    conv = encoder.patch_embed.backbone.stem.conv
    torch.nn.init.normal_(conv.weight, mean=0.3)  # a mean and a scale of its own per filter, which it removes
    filters, source = first_filters(encoder, 3)
    assert filters.shape == (64, 3, 3, 3) and "stem.conv" in source and "standardised" in source
    x = sample_images(2)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, filters, conv.bias, conv.stride, conv.padding))
    assert torch.equal(filters, standardized(conv)) and not torch.allclose(filters, conv.weight, atol=0.1)


def test_vt_filters_are_its_resnets_first_convolution():
    encoder = vt_encoder()
    filters, source = first_filters(encoder, 3)
    assert torch.equal(filters, encoder.backbone.conv1.weight) and source.startswith("backbone.conv1:")


def test_t2t_filters_give_the_first_layers_values_of_each_normalised_window():
    torch.manual_seed(0)
    encoder = small_model(*TOKENIZER_SETTINGS["t2t"], "objective=simmim").encoder
    embed = encoder.patch_embed
    layer = embed.attention1
    with torch.no_grad():
        layer.norm1.weight.normal_(1.0, 0.3)  # a gain and a shift that are not LayerNorm's defaults
        layer.norm1.bias.normal_(0.0, 0.3)
    filters, source = first_filters(encoder, 3)
    assert filters.shape == (64, 3, 3, 3) and "attention1" in source
    windows = embed.soft_split0(sample_images(1)).transpose(1, 2)[0]  # (positions, C * 3 * 3), channel-major
    with torch.no_grad():
        values = layer.attn.qkv(layer.norm1(windows))[:, 128:]  # v of every window
        normalised = F.layer_norm(windows, (27,))
        shift = layer.attn.qkv.weight[128:] @ layer.norm1.bias  # the same for every window
        torch.testing.assert_close(normalised @ filters.flatten(1).T + shift, values, rtol=1e-4, atol=1e-4)


# ---- the command, on a checkpoint of each kind ----

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each encoder kind at CIFAR scale with an objective that trains it, pretrained 2 steps on the sample."""
    made = {}
    for kind in KINDS:
        out = tmp_path_factory.mktemp(f"analyze_{kind}")
        overrides = [f"model.{o}" for o in TOKENIZER_SETTINGS[kind]] + PRETRAIN_SETTINGS.get(kind, [])
        torch.manual_seed(0)
        run_train(quick_config(out, *overrides, "train.steps=2", "train.warmup_steps=1", "log.image_every=1000",
                               "checkpoint.every=2"))
        made[kind] = out
    return made


@pytest.mark.parametrize("kind", KINDS)
def test_figures_of_each_encoder_kind(runs, kind, tmp_path):
    out = tmp_path / "figures"
    code, stdout, stderr = analyze(runs[kind], "--out", out, "--images", 8, "--show", 2)
    assert code == 0, stderr
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["checkpoints"][0]["model"]["tokenizer"] == kind
    assert set(summary["files"]) == {f"{n}.json" for n in ALL} | {f"{n}.png" for n in DRAWN[kind]}
    for name in ALL:
        (result,) = read(out, name)["checkpoints"]
        if name not in DRAWN[kind]:
            assert set(result) == {"label", "ckpt", "skipped"} and not (out / f"{name}.png").exists()
            continue
        assert "skipped" not in result, (name, result)
        (panel,) = read(out, name)["panels"]
        with Image.open(out / f"{name}.png") as image:
            pixels = pil_to_tensor(image.convert("L"))[0].float()
        x0, y0, x1, y1 = panel["box"]
        assert 0 <= x0 < x1 <= pixels.shape[1] and 0 <= y0 < y1 <= pixels.shape[0]
        assert pixels[y0:y1, x0:x1].std() > 5  # something is drawn there

    filters = read(out, "patch_filters")["checkpoints"][0]
    expected = {"patch": ([192, 3, 4, 4], "patch_embed.proj:"), "hybrid": ([64, 3, 3, 3], "patch_embed.backbone.stem.conv:"),
                "t2t": ([64, 3, 3, 3], "patch_embed.attention1."), "vt": ([64, 3, 3, 3], "backbone.conv1:")}[kind]
    assert filters["filters"] == expected[0] and filters["source"].startswith(expected[1])
    if kind == "vt":
        for name in ATTENTION:
            assert read(out, name)["checkpoints"][0]["skipped"].startswith("VT has no ")
        maps = read(out, "vt_token_maps")["checkpoints"][0]
        assert maps["modules"] == ["filter-based", "recurrent"] and maps["tokens"] == 16 and maps["grid"] == [8, 8]
        values = torch.tensor(maps["maps"])
        assert values.shape == (2, 2, 16, 8, 8) and (values >= 0).all()
        assert torch.allclose(values.sum((-2, -1)), torch.ones(2, 2, 16), atol=1e-4)  # each a distribution
        return
    assert read(out, "vt_token_maps")["checkpoints"][0]["skipped"].startswith("no visual tokens")
    distance = read(out, "attention_distance")["checkpoints"][0]
    blocks, heads = {"patch": (12, 3), "hybrid": (12, 3), "t2t": (7, 4)}[kind]
    assert distance["tokenizer"] == kind and distance["grid"] == [8, 8]
    assert distance["patch_size"] == 4  # the tokenizer's total stride: tokens 4 px apart on the image
    assert distance["diagonal"] == pytest.approx(DIAGONAL, rel=1e-4)
    values = torch.tensor(distance["distance"])
    assert values.shape == (blocks, heads) and (values > 0).all() and (values <= DIAGONAL).all()
    rollout = torch.tensor(read(out, "cls_attention")["checkpoints"][0]["rollout"])
    assert rollout.shape == (2, 8, 8) and torch.allclose(rollout.sum((1, 2)), torch.ones(2), atol=1e-4)


def test_compare_vt_with_itself_gives_identical_numbers_beside_a_vit(runs, tmp_path):
    out = tmp_path / "same"
    code, _, stderr = analyze(runs["vt"], "--compare", runs["vt"], runs["patch"], "--out", out, "--images", 4,
                              "--show", 2)
    assert code == 0, stderr
    for name in ALL:
        record = read(out, name)
        first, second, vit = record["checkpoints"]
        assert first == second, name
        assert ("skipped" in first) == (name not in DRAWN["vt"]) and ("skipped" in vit) == (name not in DRAWN["patch"])
        assert [p["label"] for p in record["panels"]] == [str(runs["vt"]), str(runs["vt"]), str(runs["patch"])]


def test_a_hog_target_skips_reconstructions_with_its_reason(tmp_path):
    out = tmp_path / "hog"
    code, _, stderr = analyze("none", "--recipe", QUICKSTART, *(f"--set=model.{o}" for o in TOKENIZER_SETTINGS["vt"]),
                              "--set", "model.objective=simmim", "--set", "model.target.kind=hog", "--out", out,
                              "--images", 2, "--show", 1, "--components", 4)
    assert code == 0, stderr
    assert read(out, "reconstructions")["checkpoints"][0]["skipped"] == "model.target.kind=hog predicts no pixels"
    assert not read(out, "vt_token_maps")["checkpoints"][0].get("skipped")


def test_logging_attention_distances_of_vt_is_refused_before_training(tmp_path):
    from mpp.config import ConfigError
    vt = [f"model.{o}" for o in TOKENIZER_SETTINGS["vt"]] + PRETRAIN_SETTINGS["vt"]
    with pytest.raises(ConfigError, match=r"log.attention_every=5: .* model.tokenizer=vt .* set log.attention_every=0"):
        quick_config(tmp_path, *vt, "log.attention_every=5")
    assert quick_config(tmp_path, *vt).log.attention_every == 0
    t2t = [f"model.{o}" for o in TOKENIZER_SETTINGS["t2t"]] + PRETRAIN_SETTINGS["t2t"]
    assert quick_config(tmp_path, *t2t, "log.attention_every=5").log.attention_every == 5
