"""mpp.analysis and `python -m mpp.analyze`: the ViT paper's analyses (mean attention distance, position-embedding
similarity, principal components of the patch filters), class-token maps and rollout, and the figures.

The measures are checked against values known in closed form; attention read through the hooks against a
reference computed from each block's input on real images; the command on real checkpoints of a short
pretraining run (sin-cos and learned positions), an export without a head and a random init.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms.functional import pil_to_tensor

from conftest import QUICKSTART, SAMPLE_DATA, quick_config, read_metrics, run_train, small_model
from mpp.analysis.attention import (attention_distances, attention_hooks, class_token_maps, mean_distance, rollout,
                                    token_centres)
from mpp.analysis.embeddings import first_filters, position_similarity, principal_components
from mpp.analyze import main as analyze_main
from mpp.checkpoint import list_checkpoints
from mpp.data import normalizer, preview_images
from mpp.export import main as export_main
from mpp.models import set_fused_attn
from mpp.models.vit import sincos_pos_embed

FIGURES = ("attention_distance", "pos_embed_similarity", "patch_filters", "reconstructions", "cls_attention")


def real_images(count: int = 8) -> torch.Tensor:
    shard = sorted(SAMPLE_DATA.glob("val-*.tar*"))[0]
    return normalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "cpu")(preview_images(str(shard), 32, count))


def distances(grid, patch):
    centres = token_centres(grid, patch)
    return torch.cdist(centres, centres)


# ---- mean attention distance ----

@pytest.mark.parametrize("grid, patch, expected", [
    ((2, 2), 4, 2 + math.sqrt(2)),  # pairs at 0 (4 of 16), 4 px (8), 4 * sqrt 2 px (4)
    ((1, 3), 2, 2 * 8 / 9),          # pairs at 0 (3 of 9), 2 px (4), 4 px (2)
    ((8, 8), 4, None),               # against a brute-force mean over every pair of cells
])
def test_uniform_attention_gives_the_grids_mean_pairwise_distance(grid, patch, expected):
    if expected is None:
        cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
        expected = patch * sum(math.dist(a, b) for a in cells for b in cells) / len(cells) ** 2
    tokens = 1 + grid[0] * grid[1]  # a class token first
    probs = torch.full((2, 3, tokens, tokens), 1 / tokens)
    distance, prefix_share = mean_distance(probs, distances(grid, patch), prefix=1)
    assert distance.shape == (2, 3)
    assert torch.allclose(distance, torch.full_like(distance, expected), atol=1e-5)
    assert torch.allclose(prefix_share, torch.full_like(prefix_share, 1 / tokens))


def test_attention_to_itself_gives_zero_and_to_a_neighbour_one_patch():
    grid, patch, n = (4, 4), 8, 16
    itself = torch.eye(n + 1).expand(1, 2, -1, -1)
    distance, prefix_share = mean_distance(itself, distances(grid, patch), prefix=1)
    assert distance.abs().max().item() == 0 and prefix_share.abs().max().item() == 0
    # Every query looks at its right neighbour (the last column at its left one): exactly one patch away.
    probs = torch.zeros(1, 1, n + 1, n + 1)
    for q in range(n):
        probs[0, 0, 1 + q, 1 + (q + 1 if q % 4 < 3 else q - 1)] = 0.6
        probs[0, 0, 1 + q, 0] = 0.4  # the class token's share is left out, the rest renormalised
    distance, prefix_share = mean_distance(probs, distances(grid, patch), prefix=1)
    assert distance.item() == pytest.approx(patch) and prefix_share.item() == pytest.approx(0.4)


def reference_attention(encoder, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax(q k^T / sqrt(d)) computed here from the block's input, the blocks run one by one."""
    x = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(imgs)))
    maps = []
    for block in encoder.blocks:
        attn = block.attn
        b, t, _ = x.shape
        q, k, _ = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        maps.append((q @ k.transpose(-2, -1) * attn.head_dim ** -0.5).softmax(-1))
        x = block(x)
    return maps


def test_hooks_read_each_blocks_attention_and_leave_the_encoder_as_it_was():
    torch.manual_seed(0)
    encoder = small_model().encoder.eval()
    set_fused_attn(encoder, True)  # the hooks need the explicit path; they must put the fused one back
    imgs = real_images(4)
    with torch.no_grad():
        before = encoder.forward_features(imgs)
        seen = {}
        with attention_hooks(encoder, lambda i, probs: seen.__setitem__(i, probs)):
            during = encoder.forward_features(imgs)
        after = encoder.forward_features(imgs)
        expected = reference_attention(encoder, imgs)
    assert sorted(seen) == list(range(12))
    for i in range(12):
        assert seen[i].shape == (4, 3, 65, 65)
        assert (seen[i] - expected[i]).abs().max().item() < 1e-5
    assert (during - before).abs().max().item() < 1e-4 and torch.equal(after, before)
    assert all(block.attn.fused_attn for block in encoder.blocks)
    assert not any(m._forward_hooks for m in encoder.modules())


def test_attention_distances_average_the_per_image_values():
    torch.manual_seed(0)
    encoder = small_model().encoder.eval()
    imgs = real_images(6)
    together = attention_distances(encoder, imgs, batch_size=4)  # batches of 4 and 2
    apart = [attention_distances(encoder, imgs[i:i + 1]) for i in range(6)]
    for key in ("distance", "prefix_share"):
        assert torch.allclose(torch.tensor(together[key]), torch.stack([torch.tensor(a[key]) for a in apart]).mean(0),
                              atol=1e-5)
    assert torch.allclose(torch.tensor(together["layer_mean"]), torch.tensor(together["distance"]).mean(1))


def test_rollout_mixes_each_block_with_the_residual_and_multiplies_in_order():
    torch.manual_seed(0)
    a1, a2 = (torch.rand(1, 5, 5).softmax(-1) for _ in range(2))
    eye = torch.eye(5)
    assert torch.allclose(rollout([a1]), 0.5 * a1 + 0.5 * eye)
    assert torch.allclose(rollout([a1, a2]), (0.5 * a2 + 0.5 * eye) @ (0.5 * a1 + 0.5 * eye))
    assert torch.allclose(rollout([eye.expand(1, 5, 5)] * 3), eye)


def test_class_token_maps_are_distributions_over_the_grid():
    torch.manual_seed(0)
    encoder = small_model().encoder.eval()
    maps = class_token_maps(encoder, real_images(3))
    for name in ("last", "rollout"):
        assert maps[name].shape == (3, 8, 8) and (maps[name] >= 0).all()
        assert torch.allclose(maps[name].sum((1, 2)), torch.ones(3))
    with torch.no_grad():
        last = reference_attention(encoder, real_images(3))[-1].mean(1)[:, 0, 1:]
    assert torch.allclose(maps["last"].flatten(1), last / last.sum(-1, keepdim=True), atol=1e-5)


# ---- embeddings ----

def test_each_position_is_similar_to_itself_and_sincos_to_its_neighbours():
    for pos_embed in ("sincos", "learned"):
        encoder = small_model(f"pos_embed={pos_embed}").encoder
        similarity = position_similarity(encoder)
        assert similarity.shape == (64, 64)
        assert torch.allclose(similarity.diagonal(), torch.ones(64), atol=1e-5)
        assert torch.allclose(similarity, similarity.T, atol=1e-6)
    # Sin-cos: the four neighbours of a cell are more alike than cells three or more rows or columns away.
    sincos = position_similarity(small_model().encoder)
    grid = token_centres((8, 8), 1)
    gap = (grid[:, None] - grid[None]).abs().max(-1).values
    near = sincos[(gap == 1) & ((grid[:, None] - grid[None]).abs().sum(-1) == 1)]
    far = sincos[gap >= 3]
    assert near.min() > far.mean()
    # The class token's row (zeros) is left out: the table is exactly the grid's.
    table = sincos_pos_embed((8, 8), 192)[0, 1:]
    assert torch.allclose(sincos, F.normalize(table, dim=-1) @ F.normalize(table, dim=-1).T, atol=1e-5)


def test_principal_components_of_filters_built_from_known_components_are_recovered():
    torch.manual_seed(0)
    known = torch.linalg.qr(torch.randn(48, 3)).Q.T  # 3 orthonormal directions in 3 x 4 x 4
    # 300 filters mixing them with uncorrelated, zero-mean weights of standard deviations 5, 2 and 1
    random = torch.randn(300, 3)
    weights = torch.linalg.qr(random - random.mean(0)).Q * 300 ** 0.5 * torch.tensor([5.0, 2.0, 1.0])
    filters = (weights @ known + 0.7 + 1e-4 * torch.randn(300, 48)).view(300, 3, 4, 4)  # plus a mean and noise
    components, share = principal_components(filters, 3)
    assert components.shape == (3, 3, 4, 4)
    cosines = (components.flatten(1) @ known.T).abs()
    assert torch.allclose(cosines, torch.eye(3), atol=1e-4)  # each one, in order of variance
    assert torch.allclose(share, torch.tensor([25.0, 4.0, 1.0]) / 30, atol=1e-4)
    flat = components.flatten(1)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()  # the sign convention


def test_filters_are_the_patch_projection_or_a_hybrids_first_convolution():
    encoder = small_model().encoder
    filters, source = first_filters(encoder, 3)
    assert torch.equal(filters, encoder.patch_embed.proj.weight) and source.startswith("patch_embed.proj:")
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, stride=2, padding=1))
    hybrid = VisionTransformer(img_size=32, patch_size=1, embed_dim=64, depth=1, num_heads=2, num_classes=0,
                               embed_layer=lambda **kw: HybridEmbed(backbone=stem, **kw))
    assert torch.equal(first_filters(hybrid, 3)[0], stem[0].weight)  # not the 1x1 projection of its features


# ---- the command, on real checkpoints ----

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short pretraining runs: sin-cos positions (2 steps), learned positions logging attention distances every
    step (3 steps, a checkpoint each), and an export of the first without its head."""
    sincos = tmp_path_factory.mktemp("sincos")
    run_train(quick_config(sincos, "train.steps=2", "train.warmup_steps=1", "log.image_every=1000"))
    learned = tmp_path_factory.mktemp("learned")
    run_train(quick_config(learned, "train.steps=3", "train.warmup_steps=1", "log.image_every=1000",
                           "model.pos_embed=learned", "log.attention_every=1", "log.attention_images=8",
                           "checkpoint.every=1", "checkpoint.keep=3"))
    export = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([str(sincos), str(export)]) == 0
    return dict(sincos=sincos, learned=learned, export=export)


def analyze(*argv) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = analyze_main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def read(out, name) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_learned_positions_train_and_log_attention_distances(runs):
    learned = runs["learned"]
    records = [r for r in read_metrics(learned) if "attention_distance_0" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    diagonal = 7 * 4 * math.sqrt(2)  # the farthest two patch centres of the 8 x 8 grid of 4 px patches
    for record in records:
        values = [record[f"attention_distance_{i}"] for i in range(12)]
        assert "attention_distance_12" not in record and all(0 < v < diagonal for v in values)
    positions = [load_file(str(c / "model.safetensors"))["encoder.pos_embed"] for c in list_checkpoints(learned)]
    assert len(positions) == 3 and not torch.equal(positions[0], positions[-1])  # they train
    assert not torch.allclose(positions[-1], sincos_pos_embed((8, 8), 192), atol=0.1)


def test_figures_have_a_panel_per_checkpoint(runs, tmp_path):
    out = tmp_path / "figures"
    code, stdout, stderr = analyze(runs["sincos"], "--compare", "none", runs["learned"], runs["export"],
                                   "--out", out, "--images", 16, "--show", 3)
    assert code == 0, stderr
    labels = [str(runs["sincos"]), "random init (seed 0)", str(runs["learned"]), str(runs["export"])]
    for name in FIGURES:
        record = read(out, name)
        assert [c["label"] for c in record["checkpoints"]] == labels
        assert [p["label"] for p in record["panels"]] == labels
        with Image.open(out / f"{name}.png") as image:
            pixels = pil_to_tensor(image.convert("L"))[0].float()
        for panel in record["panels"]:
            x0, y0, x1, y1 = panel["box"]
            assert 0 <= x0 < x1 <= pixels.shape[1] and 0 <= y0 < y1 <= pixels.shape[0]
            assert pixels[y0:y1, x0:x1].std() > 5  # something is drawn there
    distance = read(out, "attention_distance")["checkpoints"]
    assert all(torch.tensor(c["distance"]).shape == (12, 3) for c in distance)
    assert distance[0]["images"] == 16 and distance[0]["uniform"] == pytest.approx(
        distances((8, 8), 4).mean().item(), rel=1e-4)
    similarity = read(out, "pos_embed_similarity")["checkpoints"]
    assert [c["pos_embed"] for c in similarity] == ["sincos", "sincos", "learned", "sincos"]
    learned_pos = load_file(str(list_checkpoints(runs["learned"])[-1] / "model.safetensors"))["encoder.pos_embed"][0, 1:]
    direct = F.normalize(learned_pos, dim=-1) @ F.normalize(learned_pos, dim=-1).T
    assert torch.allclose(torch.tensor(similarity[2]["similarity"]), direct, atol=1e-4)
    filters = read(out, "patch_filters")["checkpoints"]
    assert all(c["filters"] == [192, 3, 4, 4] and len(c["variance_share"]) == 28 for c in filters)
    reconstructions = read(out, "reconstructions")["checkpoints"]
    assert [("skipped" in c) for c in reconstructions] == [False, False, False, True]  # the export has no head
    assert all(0 < c["loss"] < 10 and c["images"] == 3 for c in reconstructions[:3])
    assert all(torch.tensor(c["rollout"]).shape == (3, 8, 8) for c in read(out, "cls_attention")["checkpoints"])
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["images"]["count"] == {"32": 16} and summary["images"]["split"] == "val"


def test_compare_with_itself_gives_identical_numbers(runs, tmp_path):
    out = tmp_path / "same"
    code, _, stderr = analyze(runs["learned"], "--compare", runs["learned"], "--out", out, "--images", 8,
                              "--show", 2)
    assert code == 0, stderr
    for name in FIGURES:
        first, second = read(out, name)["checkpoints"]
        assert first == second and "skipped" not in first, name


def test_random_init_needs_a_model_shape(tmp_path):
    code, _, stderr = analyze("none", "--out", tmp_path / "none")
    assert code == 2 and "--recipe" in stderr
    code, _, stderr = analyze("none", "--recipe", QUICKSTART, "--set", "model.encoder=small", "--out", tmp_path / "ok",
                              "--images", 4, "--show", 1, "--components", 4)
    assert code == 0, stderr
    assert torch.tensor(read(tmp_path / "ok", "attention_distance")["checkpoints"][0]["distance"]).shape == (12, 6)
