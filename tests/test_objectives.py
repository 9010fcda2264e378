"""Objectives on the shared model layer: MAE, SimMIM and the ViT paper's masked patch prediction, with every
target, mask kind and tokenizer; what each loss counts, what each encoder sees, the config's refusals, and MAE
unchanged from before the layer was split into parts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import QUICKSTART, model_config, small_model
from mpp.config import PretrainConfig
from mpp.data import normalizer, preview_images
from mpp.models import OBJECTIVES, TARGETS, TOKENIZERS, VIT_SIZES, build_model, set_fused_attn
from mpp.models.batch_losses import contrastive_loss, uniformity_loss
from mpp.models.mae import MAEDecoder
from mpp.models.masking import make_mask
from mpp.models.patches import gather_tokens
from mpp.models.views import random_view
from mpp.models.vit_mpp import corruption_plan
from mpp.recipe import ConfigError, load_config
from mpp.weights import vit_state

REFERENCE = Path(__file__).parent / "data" / "mae_reference_losses.json"
SAMPLE_SHARD = Path(__file__).resolve().parents[1] / "mpp" / "sample_data" / "cifar10" / "train-000000.tar.gz"
OBJECTIVE_SETTINGS = {  # each objective at its paper's defaults, scaled to the quickstart's model
    "mae": [],
    "simmim": ["objective=simmim", "mask.unit=2", "mask.ratio=0.6", "target.loss=l1", "target.norm_pix=false"],
    "vit_mpp": ["objective=vit_mpp", "mask.ratio=0.5", "target.kind=mean_color"],
}
# Every tokenizer at 32 px with stride 4 (the quickstart's 8 x 8 grid), as small as its architecture allows.
TOKENIZER_SETTINGS = {
    "patch": [],
    "hybrid": ["tokenizer=hybrid", "hybrid.stem=small", "hybrid.layers=[1,1,1]"],
    "t2t": ["tokenizer=t2t", "encoder=t2t_7", "t2t.splits=[[3,1,1],[3,2,1],[3,2,1]]"],
    "vt": ["tokenizer=vt", "encoder=vt_r18", "vt.stem=small"],
}
TOKENIZER_OBJECTIVES = [(t, o) for t in TOKENIZER_SETTINGS for o in OBJECTIVES
                        if TOKENIZERS[t]["vit"] or o == "simmim"
                        if TOKENIZERS[t]["independent_tokens"] or o != "vit_mpp"]


def sample_images(count: int = 16) -> torch.Tensor:
    """The first `count` images of the shipped sample, centre crops at 32 px, normalised."""
    imgs = preview_images(str(SAMPLE_SHARD), 32, count=count)
    return normalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "cpu")(imgs)


def capture(module: torch.nn.Module) -> list:
    """Outputs of `module`'s calls, kept with their gradients."""
    seen = []

    def hook(_, __, output):
        if output.requires_grad:
            output.retain_grad()
        seen.append(output)
    module.register_forward_hook(hook)
    return seen


# ---- MAE as it was ----

@pytest.mark.parametrize("case", json.loads(REFERENCE.read_text())["cases"])
def test_first_losses_equal_the_model_layer_before_the_split(case):
    reference = json.loads(REFERENCE.read_text())["cases"][case]
    cfg = load_config(PretrainConfig, QUICKSTART, reference["overrides"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    imgs, losses = sample_images(), []
    for _ in range(4):
        loss = model(imgs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses == pytest.approx(reference["losses"], rel=1e-4)


# ---- the encoder is timm's ViT ----

@pytest.mark.parametrize("size,img_size,patch_size,fused", [("tiny", 32, 4, False), ("tiny", 32, 4, True),
                                                           ("small", 64, 16, False)])
def test_encoder_is_a_timm_vit(size, img_size, patch_size, fused):
    torch.manual_seed(0)
    model = small_model(f"encoder={size}", f"img_size={img_size}", f"patch_size={patch_size}").eval()
    set_fused_attn(model, fused)
    width, depth, heads = VIT_SIZES[size]
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                            embed_dim=width, depth=depth, num_heads=heads).eval()
    vit.load_state_dict(model.encoder.state_dict(), strict=True)
    imgs = torch.randn(3, 3, img_size, img_size)
    n = (img_size // patch_size) ** 2
    tokens = model.encoder.add_positions(model.encoder.embed(imgs))
    with torch.no_grad():
        ours = model.encode(tokens)
        theirs = vit.forward_features(imgs)
        # Tokens in any order: the same features, in that order (the encoder is permutation-equivariant).
        order = torch.stack([torch.randperm(n) for _ in range(3)])
        shuffled = model.encode(gather_tokens(tokens, order))
    assert ours.shape == theirs.shape == (3, 1 + n, width)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (shuffled[:, 0] - theirs[:, 0]).abs().max().item() < 1e-4
    assert (shuffled[:, 1:] - gather_tokens(theirs[:, 1:], order)).abs().max().item() < 1e-4


def test_position_embedding_is_fixed_sincos_or_learned():
    model = small_model()
    pos = model.encoder.pos_embed
    assert not pos.requires_grad and not model.head.pos_embed.requires_grad
    assert pos.shape == (1, 65, 192)
    assert torch.equal(pos[0, 0], torch.zeros(192))  # the class token's row
    assert pos[0, 1:].abs().max().item() <= 1.0 and len({tuple(r.tolist()) for r in pos[0, 1:]}) == 64
    learned = small_model("pos_embed=learned")
    assert learned.encoder.pos_embed.requires_grad
    before = learned.encoder.pos_embed.detach().clone()
    optimizer = torch.optim.SGD(learned.parameters(), lr=1.0)
    learned(sample_images(4)).loss.backward()
    optimizer.step()
    assert not torch.equal(before, learned.encoder.pos_embed)  # it trains
    assert "encoder.pos_embed" in learned.no_weight_decay()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_exported_encoder_of_every_objective_loads_into_timm(objective):
    torch.manual_seed(0)
    model = small_model(*OBJECTIVE_SETTINGS[objective]).eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=0).eval()
    vit.load_state_dict(vit_state(model.state_dict()), strict=True)
    imgs = sample_images(4)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.encoder.forward_features(imgs))


# ---- one named result ----

def test_forward_returns_one_named_result_with_the_ratio_per_sample():
    torch.manual_seed(0)
    model = small_model("mask.ratio=0.75").eval()
    imgs = sample_images(4)
    with torch.no_grad():
        out = model(imgs)
        half = model(imgs, mask_ratio=0.5)
    assert out.pred.shape == (4, 64, 4 * 4 * 3)
    assert out.hidden.sum(1).tolist() == [48] * 4 and torch.equal(out.hidden, out.scored)
    assert half.hidden.sum(1).tolist() == [32] * 4
    assert len({tuple(row.tolist()) for row in out.hidden}) == 4
    assert set(out.terms) == {"reconstruction"} and torch.equal(out.loss, out.terms["reconstruction"])


# ---- what each objective's loss counts, and what its encoder sees ----

COMBINATIONS = [(o, t, k) for o in OBJECTIVES for t in TARGETS for k in ("random", "block")]


@pytest.mark.parametrize("objective,target,kind", COMBINATIONS)
def test_every_combination_builds_and_trains_a_step(objective, target, kind):
    torch.manual_seed(0)
    model = small_model(*OBJECTIVE_SETTINGS[objective], f"target.kind={target}", f"mask.kind={kind}",
                        "mask.min_block=4")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(sample_images(4))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.pred.shape[:2] == (4, 64) and out.pred.shape[2] == model.target.dim
    out.loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any(n.startswith("encoder.blocks.") for n in changed) and any(n.startswith("head.") for n in changed)


@pytest.mark.parametrize("tokenizer,objective", TOKENIZER_OBJECTIVES)
@pytest.mark.parametrize("target", TARGETS)
def test_loss_counts_only_scored_tokens(tokenizer, objective, target):
    torch.manual_seed(0)
    model = small_model(*TOKENIZER_SETTINGS[tokenizer], *OBJECTIVE_SETTINGS[objective], f"target.kind={target}")
    preds = capture(model.head.pred)
    out = model(sample_images(8))
    out.loss.backward()
    grad = preds[0].grad.abs().sum(-1)  # (B, N): how much each token's prediction moves the loss
    assert torch.all(grad[~out.scored] == 0) and torch.all(grad[out.scored] > 0)
    n = 64
    if objective == "vit_mpp":  # half the tokens corrupted; of those, [mask]-hidden ones only some
        assert out.scored.sum(1).tolist() == [n // 2] * 8
        assert torch.all(out.scored | ~out.hidden) and 0 < out.hidden.sum() < out.scored.sum()
    else:
        assert torch.equal(out.scored, out.hidden)
        assert out.scored.sum(1).tolist() == [48 if objective == "mae" else 4 * round(16 * 0.6)] * 8


def encoder_outputs(model) -> list:
    """What the encoder hands the objective's head in each call: MAE's latent (the decoder's input), SimMIM's
    and vit_mpp's output at every grid position (the input of the head's linear layer)."""
    seen = []
    layer = model.head if isinstance(model.head, MAEDecoder) else model.head.pred
    layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    return seen


@pytest.mark.parametrize("tokenizer,objective", TOKENIZER_OBJECTIVES)
@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hidden_pixels_reach_nothing_the_encoder_outputs(tokenizer, objective, kind, training):
    # In training mode too: the CNN tokenizers' norms then take batch statistics (over visible positions only).
    torch.manual_seed(0)
    model = small_model(*TOKENIZER_SETTINGS[tokenizer], *OBJECTIVE_SETTINGS[objective], f"mask.kind={kind}",
                        "mask.min_block=4").train(training)
    outputs = encoder_outputs(model)
    imgs = sample_images(4)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(imgs)
        hidden = first.hidden.view(4, 1, 8, 1, 8, 1).expand(4, 3, 8, 4, 8, 4).reshape(4, 3, 32, 32)
        changed = torch.where(hidden, torch.randn_like(imgs) * 3, imgs)
        torch.manual_seed(1)
        second = model(changed)
        assert torch.equal(first.hidden, second.hidden)
        assert torch.equal(outputs[0], outputs[1])  # the encoder's output, bit for bit
        assert torch.equal(first.pred, second.pred)  # and so every prediction
        # A visible pixel, in contrast, reaches it.
        visible = torch.where(~hidden, torch.randn_like(imgs), imgs)
        torch.manual_seed(1)
        model(visible)
    assert not torch.allclose(outputs[0], outputs[2])


# ---- the ViT paper's corruption ----

def test_corruption_splits_80_10_10():
    corrupted = torch.rand(1000, 1000, generator=torch.Generator().manual_seed(0)) < 0.5
    to_mask, to_random = corruption_plan(corrupted, 0.8, 0.1, generator=torch.Generator().manual_seed(1))
    total = corrupted.sum().item()
    assert not (to_mask & to_random).any() and not ((to_mask | to_random) & ~corrupted).any()
    assert to_mask.sum().item() / total == pytest.approx(0.8, abs=0.01)
    assert to_random.sum().item() / total == pytest.approx(0.1, abs=0.01)
    unchanged = corrupted & ~to_mask & ~to_random
    assert unchanged.sum().item() / total == pytest.approx(0.1, abs=0.01)


def test_vit_mpp_feeds_the_encoder_mask_tokens_other_patches_and_unchanged_ones():
    torch.manual_seed(0)
    model = small_model(*OBJECTIVE_SETTINGS["vit_mpp"]).eval()
    inputs = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    imgs = sample_images(16)
    with torch.no_grad():
        out = model(imgs)
        own = model.encoder.patch_embed(imgs)  # each patch's embedding, before positions
    enc = model.encoder
    tokens = inputs[0][:, 1:] - enc.pos_embed[:, 1:]  # what replaced each token, positions taken off
    fates = {"mask": 0, "own": 0, "other": 0}
    for b in range(16):
        uncorrupted = own[b][~out.scored[b]]
        for i in range(64):
            t = tokens[b, i]
            if out.hidden[b, i]:
                torch.testing.assert_close(t, model.head.mask_token[0, 0], rtol=0, atol=1e-5)
                fates["mask"] += 1
            elif not out.scored[b, i]:
                torch.testing.assert_close(t, own[b, i], rtol=0, atol=1e-5)
            elif torch.allclose(t, own[b, i], atol=1e-5):
                fates["own"] += 1
            else:  # another patch of the same image, an uncorrupted one
                assert (uncorrupted - t).abs().amax(-1).min() < 1e-5
                fates["other"] += 1
    total = sum(fates.values())
    assert total == 16 * 32
    assert fates["mask"] / total == pytest.approx(0.8, abs=0.06)  # 512 tokens: ~3 standard deviations
    assert fates["other"] / total == pytest.approx(0.1, abs=0.05) and fates["own"] / total == pytest.approx(0.1, abs=0.05)


# ---- the config refuses what cannot be built, naming the keys ----

@pytest.mark.parametrize("overrides,keys", [
    (["model.mask.unit=3"], ["model.mask.unit", "model.img_size", "model.patch_size"]),
    (["model.target.kind=hog", "model.target.hog_cell=3"], ["model.target.hog_cell", "model.patch_size"]),
    (["model.decoder.dim=64", "model.decoder.heads=3"], ["model.decoder.heads", "model.decoder.dim"]),
    (["model.objective=vit_mpp", "model.corruption.mask_token=0.95"],
     ["model.corruption.mask_token", "model.corruption.random_patch"]),
    (["model.mask.unit=4", "model.mask.ratio=0.9"], ["model.mask.ratio", "model.mask.unit"]),
    (["model.fuse_blocks=[11]"], ["model.fuse_blocks", "model.encoder"]),
    (["model.objective=bert"], ["model.objective"]),
    (["model.target.kind=depth"], ["model.target.kind"]),
    (["model.mask.kind=grid"], ["model.mask.kind"]),
    (["model.img_size=30"], ["model.img_size", "model.patch_size"]),
    # every tokenizer x objective that cannot work, and the tokenizers' own sections
    (["model.tokenizer=vt", "model.encoder=vt_r18", "model.vt.stem=small"], ["model.objective", "model.tokenizer"]),
    (["model.tokenizer=vt", "model.encoder=vt_r18", "model.vt.stem=small", "model.objective=vit_mpp"],
     ["model.objective", "model.tokenizer"]),
    (["model.tokenizer=hybrid", "model.hybrid.stem=small", "model.objective=vit_mpp"],
     ["model.objective", "model.tokenizer"]),
    (["model.tokenizer=t2t", "model.encoder=t2t_7", "model.t2t.splits=[[3,1,1],[3,2,1],[3,2,1]]",
      "model.objective=vit_mpp"], ["model.objective", "model.tokenizer"]),
    (["model.tokenizer=vt", "model.encoder=vt_r18", "model.vt.stem=small", "model.objective=simmim",
      "model.fuse_blocks=[0]"], ["model.fuse_blocks", "model.tokenizer"]),
    (["model.tokenizer=vt", "model.encoder=tiny"], ["model.encoder", "model.tokenizer"]),
    (["model.tokenizer=t2t", "model.encoder=t2t_7"], ["model.patch_size", "model.tokenizer", "model.t2t.splits"]),
    (["model.tokenizer=hybrid"], ["model.patch_size", "model.tokenizer", "model.hybrid.layers", "model.hybrid.stem"]),
    (["model.tokenizer=vt", "model.encoder=vt_r18", "model.objective=simmim"],
     ["model.patch_size", "model.tokenizer", "model.vt.stem"]),
    (["model.tokenizer=t2t", "model.encoder=t2t_7", "model.patch_size=4", "model.t2t.splits=[[3,1,0],[3,2,0],[3,2,1]]"],
     ["model.t2t.splits", "model.img_size"]),
    (["model.tokenizer=hybrid", "model.hybrid.layers=[]"], ["model.hybrid.layers"]),
    (["model.tokenizer=resnet"], ["model.tokenizer"]),
])
def test_impossible_models_fail_when_the_config_is_read(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, QUICKSTART, overrides)
    message = str(err.value)
    assert "\n" not in message
    for key in keys:
        assert key in message


def test_renamed_keys_point_to_their_new_place():
    for old, new in [("model.mask_ratio=0.6", "model.mask.ratio"), ("model.decoder_dim=64", "model.decoder.dim"),
                     ("model.norm_pix_loss=false", "model.target.norm_pix")]:
        with pytest.raises(ConfigError, match=new.replace(".", r"\.")):
            load_config(PretrainConfig, QUICKSTART, [old])


# ---- batch terms and block fusion, on any objective ----

def test_uniformity_loss_is_one_when_collapsed_and_one_over_batch_when_orthogonal():
    width, batch = 8, 4
    collapsed = torch.randn(1, width).expand(batch, -1) * (torch.rand(batch, 1) + 0.5)
    assert uniformity_loss(collapsed).item() == pytest.approx(1.0, abs=1e-6)
    orthogonal = 2.0 * torch.eye(width)[:batch]
    assert uniformity_loss(orthogonal).item() == pytest.approx(1 / batch, abs=1e-6)
    features = torch.randn(6, width, generator=torch.Generator().manual_seed(0))
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0) ** 2 for a in features for b in features]
    torch.testing.assert_close(uniformity_loss(features), torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_uniformity_weight_adds_its_term_on_the_mean_visible_token(objective):
    torch.manual_seed(0)
    plain = small_model(*OBJECTIVE_SETTINGS[objective])
    regularised = small_model(*OBJECTIVE_SETTINGS[objective], "uniformity=0.5")
    regularised.load_state_dict(plain.state_dict())
    imgs = sample_images(4)
    outputs = capture(plain.encoder.norm)
    torch.manual_seed(2)
    plain_out = plain(imgs)
    tokens = outputs[0][:, 1:]
    if objective == "mae":  # the encoder saw the visible tokens only
        features = tokens.mean(1)
    else:
        seen = ~plain_out.scored
        features = (tokens * seen.unsqueeze(-1)).sum(1) / seen.sum(1, keepdim=True)
    term = uniformity_loss(features)
    torch.manual_seed(2)
    out = regularised(imgs)
    assert term.item() > 0.1
    torch.testing.assert_close(out.terms["uniformity"], term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, plain_out.loss + 0.5 * term, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_against_its_formula_and_a_loop():
    batch, t = 3, 0.1
    z = torch.eye(2 * batch)[:batch].repeat(2, 1) * 3.0
    expected = -torch.log(torch.tensor(1 / t).exp() / (torch.tensor(1 / t).exp() + 2 * batch - 2))
    torch.testing.assert_close(contrastive_loss(z, t), expected, rtol=1e-5, atol=1e-6)
    z = torch.randn(2 * batch, 5, generator=torch.Generator().manual_seed(0))
    zn = torch.nn.functional.normalize(z, dim=-1)
    terms = []
    for i in range(2 * batch):
        twin = (i + batch) % (2 * batch)
        others = [j for j in range(2 * batch) if j != i]
        sims = torch.stack([zn[i] @ zn[j] / t for j in others])
        terms.append(torch.logsumexp(sims, 0) - zn[i] @ zn[twin] / t)
    torch.testing.assert_close(contrastive_loss(z, t), torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


def test_batch_terms_run_in_float32_under_autocast():
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    exact = contrastive_loss(z, 0.1), uniformity_loss(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contrastive_loss(z, 0.1), uniformity_loss(z)
    for m, e in zip(mixed, exact):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, e, rtol=1e-6, atol=1e-6)


def test_contrastive_weight_adds_its_term_over_both_views():
    torch.manual_seed(0)
    model = small_model("contrastive=0.3", "contrastive_temperature=0.2")
    imgs = sample_images(4)
    latents = capture(model.encoder.norm)
    torch.manual_seed(2)
    out = model(imgs)
    assert out.pred.shape[0] == out.hidden.shape[0] == 8  # the batch and its second views
    torch.manual_seed(2)
    both = torch.cat([imgs, random_view(imgs)])
    mask = make_mask("random", 8, (8, 8), 0.75)
    assert torch.equal(out.hidden, mask.masked)
    term = contrastive_loss(model.projector(latents[0][:, 1:].mean(1)), 0.2)
    assert term.item() > 0.5
    torch.testing.assert_close(out.terms["contrastive"], term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.terms["reconstruction"] + 0.3 * term, rtol=1e-5, atol=1e-6)
    assert both.shape[0] == 8
    model.eval()  # previews: the plain objective on the images given
    assert model(imgs).pred.shape[0] == 4
    assert small_model().projector is None  # no term, no head


def test_fuse_blocks_feed_the_head_a_weighted_sum_of_blocks():
    torch.manual_seed(0)
    model = small_model("fuse_blocks=[3,1]")
    with torch.no_grad():
        model.fusion.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))  # blocks 1, 3 and the last (11)
    imgs = sample_images(3)
    ids_keep = make_mask("random", 3, (8, 8), 0.75, generator=torch.Generator().manual_seed(2)).ids_keep
    enc = model.encoder
    tokens = gather_tokens(enc.patch_embed(imgs) + enc.pos_embed[:, 1:], ids_keep)
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(3, -1, -1), tokens], dim=1)
    outputs = []
    for block in enc.blocks:
        x = block(x)
        outputs.append(x)
    w = torch.tensor([0.5, -1.0, 2.0]).softmax(0)
    expected = enc.norm(w[0] * model.fusion.proj[0](outputs[1]) + w[1] * model.fusion.proj[1](outputs[3])
                        + w[2] * outputs[11])
    torch.testing.assert_close(model.encode(tokens), expected, rtol=1e-5, atol=1e-5)
    plain = small_model()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(plain.encode(tokens), enc.norm(outputs[11]), rtol=1e-5, atol=1e-5)
    assert plain.fusion is None


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fuse_blocks_train_their_layers_and_weights_with_any_objective(objective):
    torch.manual_seed(0)
    model = small_model(*OBJECTIVE_SETTINGS[objective], "fuse_blocks=[0,5]")
    model(sample_images(4)).loss.backward()
    assert model.fusion.weights.grad.abs().min() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.proj.parameters())


def test_model_config_helper_reads_the_quickstart():
    m = model_config()
    assert (m.encoder, m.img_size, m.patch_size, m.decoder.dim) == ("tiny", 32, 4, 64)
