"""The seeds' other encoders: the ViT hybrid (a ResNet's map as tokens), T2T-ViT and VT-ResNet.

Their architecture against the papers (T2T shapes and parameter counts, VT's equations transcribed), the
hybrid against timm's own hybrid ViT, the mask-aware CNN layers, and each end to end: pretraining on the
shipped sample with a falling loss, a probe's encoder, a fine-tuning step, export and reload, previews.
(Leakage of hidden pixels and what each loss counts: tests/test_objectives.py, over every tokenizer.)"""
from __future__ import annotations

import contextlib
import io
import json
import logging

import pytest
import timm
import torch
from safetensors import safe_open

from conftest import SAMPLE_DATA, quick_config, read_metrics, run_train, small_model
from test_objectives import TOKENIZER_SETTINGS, sample_images
from mpp.export import main as export_main
from mpp.features import pooled_features
from mpp.models import build_encoder, frozen_encoder, load_encoder, t2t_encoder
from mpp.models.hybrid import hybrid_encoder, timm_hybrid
from mpp.models.sparse import SparseBatchNorm2d, SparseGroupNormAct, Visibility, mask_aware
from mpp.models.t2t import T2TLayer, T2TTokens
from mpp.models.vt import FilterTokenizer, Projector, RecurrentTokenizer, TokenTransformer, VTEncoder, as_rows
from mpp.visualize import reconstruction_grid

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CIFAR_SPLITS = [[3, 1, 1], [3, 2, 1], [3, 2, 1]]
# The CIFAR-scale settings of each new tokenizer with an objective that trains it (pretraining overrides).
PRETRAIN_SETTINGS = {
    "hybrid": ["model.objective=mae"],
    "t2t": ["model.objective=simmim", "model.mask.unit=2", "model.mask.ratio=0.6", "model.target.loss=l1",
            "model.target.norm_pix=false"],
    "vt": ["model.objective=simmim", "model.mask.unit=2", "model.mask.ratio=0.6", "model.target.loss=l1",
           "model.target.norm_pix=false"],
}


# ---- T2T-ViT ----

def test_t2t_module_shapes_after_each_stage_and_total_stride():
    torch.manual_seed(0)
    seen = []
    module = T2TTokens(img_size=224, patch_size=16, embed_dim=384)
    for name in ("soft_split0", "attention1", "soft_split1", "attention2", "soft_split2", "project"):
        getattr(module, name).register_forward_hook(lambda m, _, out, name=name: seen.append((name, tuple(out.shape))))
    with torch.no_grad():
        tokens = module(torch.randn(2, 3, 224, 224))
    # The paper's module: 56x56 tokens of 3*7*7, then 64 wide; 28x28 of 64*3*3; 14x14 of 64*3*3; then D.
    assert seen == [("soft_split0", (2, 147, 3136)), ("attention1", (2, 3136, 64)), ("soft_split1", (2, 576, 784)),
                    ("attention2", (2, 784, 64)), ("soft_split2", (2, 576, 196)), ("project", (2, 196, 384))]
    assert tokens.shape == (2, 196, 384) and module.grid_size == (14, 14) and module.patch_size == (16, 16)
    small = T2TTokens(img_size=32, patch_size=4, embed_dim=256, splits=CIFAR_SPLITS)
    assert small.sizes == [32, 16, 8] and small.grid_size == (8, 8) and small(torch.randn(1, 3, 32, 32)).shape == (1, 64, 256)
    assert t2t_encoder("t2t_7", 32, splits=CIFAR_SPLITS).patch_size == 4


@pytest.mark.parametrize("size,paper", [("t2t_7", 4.3e6), ("t2t_14", 21.5e6)])
def test_t2t_vit_parameter_counts_match_the_paper(size, paper):
    with torch.device("meta"):
        model = t2t_encoder(size, 224, num_classes=1000, weight_init="skip")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / paper - 1) < 0.02, count


def test_t2t_layer_takes_its_residual_from_v():
    torch.manual_seed(0)
    layer = T2TLayer(27, 8).eval()
    x = torch.randn(2, 10, 27)
    with torch.no_grad():
        q, k, v = layer.attn.qkv(layer.norm1(x)).chunk(3, dim=-1)
        attn = (q @ k.transpose(1, 2) / 27 ** 0.5).softmax(-1)  # one head, scaled by the input width
        y = v + layer.attn.proj(attn @ v)
        torch.testing.assert_close(layer(x), y + layer.mlp(layer.norm2(y)), rtol=1e-5, atol=1e-5)
    assert layer.mlp.fc1.out_features == 8  # MLP ratio 1


# ---- VT: the paper's equations, transcribed ----

def test_vt_tokenizers_transformer_and_projector_follow_the_equations():
    torch.manual_seed(0)
    B, HW, C, L = 2, 12, 16, 4
    X, T_in = torch.randn(B, HW, C), torch.randn(B, L, C)
    filt, recur, transformer, projector = FilterTokenizer(C, L), RecurrentTokenizer(C), TokenTransformer(C), Projector(C)
    W_A = filt.W_A.weight.T                       # C x L
    W_TR = recur.W_TR.weight.T                    # C x C
    K, Q, F1, F2 = (getattr(transformer, n).weight.T for n in ("K", "Q", "F1", "F2"))
    W_Q, W_K = projector.W_Q.weight.T, projector.W_K.weight.T
    with torch.no_grad():
        # filter-based: T = softmax_HW(X W_A)^T X
        A = torch.einsum("bnc,cl->bnl", X, W_A).softmax(dim=1)
        torch.testing.assert_close(filt(X), torch.einsum("bnl,bnc->blc", A, X))
        # recurrent: W_R = T_in W_T->R, T = softmax_HW(X W_R)^T X  (W_R as C x L: its transpose)
        W_R = torch.einsum("blc,cd->bdl", T_in, W_TR)
        A = torch.einsum("bnc,bcl->bnl", X, W_R).softmax(dim=1)
        torch.testing.assert_close(recur(X, T_in), torch.einsum("bnl,bnc->blc", A, X))
        # transformer: T' = T_in + softmax_L((T_in K)(T_in Q)^T) T_in, T_out = T' + ReLU(T' F1) F2
        S = torch.einsum("blc,bmc->blm", T_in @ K, T_in @ Q).softmax(dim=-1)
        T1 = T_in + torch.einsum("blm,bmc->blc", S, T_in)
        T_out = T1 + torch.relu(T1 @ F1) @ F2
        torch.testing.assert_close(transformer(T_in), T_out)
        # projector: X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T
        P = torch.einsum("bnc,blc->bnl", X @ W_Q, T_out @ W_K).softmax(dim=-1)
        torch.testing.assert_close(projector(X, T_out), X + torch.einsum("bnl,blc->bnc", P, T_out))


def test_vt_masked_positions_get_no_weight_in_the_spatial_softmax():
    torch.manual_seed(0)
    X = torch.randn(1, 6, 8)
    visible = torch.tensor([[True, False, True, True, False, True]])
    filt = FilterTokenizer(8, 3)
    changed = X.clone()
    changed[0, 1] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(filt(X, visible), filt(changed, visible))
        A = filt.W_A(X[:, visible[0]]).softmax(dim=1)  # the softmax over the visible rows alone
        torch.testing.assert_close(filt(X, visible), torch.einsum("bnl,bnc->blc", A, X[:, visible[0]]))


def test_map_rows_are_positions_with_their_channels():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    rows = as_rows(x)
    assert rows.shape == (2, 20, 3)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (1, 3, 4)]:
        assert torch.equal(rows[b, i * 5 + j], x[b, :, i, j])  # not a reshape of NCHW memory


def test_vt_resnet18_shapes_and_classifier_on_the_mean_token():
    torch.manual_seed(0)
    vt = VTEncoder("vt_r18", 224, num_classes=10).eval()
    assert (vt.grid, vt.patch_size, vt.width, len(vt.blocks)) == ((14, 14), 16, 256, 2)
    assert isinstance(vt.blocks[0].tokenizer, FilterTokenizer) and isinstance(vt.blocks[1].tokenizer, RecurrentTokenizer)
    assert not hasattr(vt.backbone.layer4, "weight") and not any(k.startswith("backbone.layer4") for k in vt.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        rows = vt.feature_map(x)
        assert rows.shape == (2, 196, 256)
        tokens = vt.forward_features(x)
        assert tokens.shape == (2, 16, 256)
        torch.testing.assert_close(vt(x), vt.head(tokens.mean(1)))
        torch.testing.assert_close(pooled_features(vt, x, "mean", 2)[:, 256:], tokens.mean(1))
        raw = vt.run_blocks(rows)[0]  # the modules' tokens before the final norm
        torch.testing.assert_close(tokens, vt.norm(raw[-1]))
        torch.testing.assert_close(pooled_features(vt, x, "mean", 2)[:, :256], vt.norm(raw[0]).mean(1))
    assert VTEncoder("vt_r18", 32, stem="small").grid == (8, 8)


# ---- the hybrid is timm's ----

def test_hybrid_state_dict_loads_into_timm_hybrid_strictly_with_equal_features():
    torch.manual_seed(0)
    ours = hybrid_encoder("tiny", 32, 16).eval()  # R50 s16 stages, timm's stem, at 32 px: a 2x2 grid
    name, size = timm_hybrid("tiny", (3, 4, 9), "timm")
    assert name == "vit_base_r50_s16_224"
    theirs = timm.create_model(name, pretrained=False, img_size=32, num_classes=0, **size).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = sample_images(3)
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x), theirs.forward_features(x))
    assert hybrid_encoder("tiny", 32, 4, stem="small").grid == (8, 8)
    assert timm_hybrid("tiny", (3, 4, 9), "small") is None


# ---- the mask-aware CNN layers ----

def test_sparse_norms_take_statistics_over_visible_positions_only():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    grid = torch.rand(2, 1, 2, 2) > 0.4
    grid[:, :, 0, 0] = True
    visibility = Visibility()
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(1, 8))  # GroupNorm: refused below
    with pytest.raises(TypeError, match="GroupNorm"):
        mask_aware(bn)
    gn = timm.layers.GroupNormAct(8, num_groups=2, apply_act=False)
    bn = torch.nn.BatchNorm2d(8)
    holder = torch.nn.Sequential(gn, bn)
    visibility = mask_aware(holder)
    assert type(gn) is SparseGroupNormAct and type(bn) is SparseBatchNorm2d
    with visibility.showing(grid):
        visible = visibility.at(x)
        gn_out, bn_out = gn(x), bn.train()(x)
    rows = x.permute(0, 2, 3, 1)[visible[:, 0]]  # (visible positions, channels)
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    torch.testing.assert_close(bn_out.permute(0, 2, 3, 1)[visible[:, 0]], (rows - mean) / (var + bn.eps).sqrt())
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    assert torch.all(bn_out.permute(0, 2, 3, 1)[~visible[:, 0]] == 0) and torch.all(gn_out.permute(0, 2, 3, 1)[~visible[:, 0]] == 0)
    for b in range(2):
        for g in range(2):
            values = x[b, 4 * g:4 * g + 4].permute(1, 2, 0)[visible[b, 0]]
            expected = (values - values.mean()) / (values.var(unbiased=False) + gn.eps).sqrt()
            torch.testing.assert_close(gn_out[b, 4 * g:4 * g + 4].permute(1, 2, 0)[visible[b, 0]], expected)
    # Nothing hidden: the layers are timm's and torch's own.
    torch.testing.assert_close(gn(x), torch.nn.functional.group_norm(x, 2, gn.weight, gn.bias, gn.eps))


# ---- end to end on the shipped sample ----

@pytest.fixture(scope="module", params=["hybrid", "t2t", "vt"])
def pretrained(request, tmp_path_factory):
    tokenizer = request.param
    out = tmp_path_factory.mktemp(f"pretrain_{tokenizer}")
    overrides = [f"model.{o}" for o in TOKENIZER_SETTINGS[tokenizer]] + PRETRAIN_SETTINGS[tokenizer]
    cfg = quick_config(out, *overrides, "train.steps=40", "train.warmup_steps=5", "log.every=1",
                       "log.image_every=40", "checkpoint.every=40", "optim.base_lr=2e-3")
    torch.manual_seed(0)
    model = run_train(cfg).eval()
    return dict(tokenizer=tokenizer, run=out, cfg=cfg, model=model)


def test_each_encoder_pretrains_on_the_sample_with_a_falling_loss(pretrained):
    losses = [r["loss"] for r in read_metrics(pretrained["run"]) if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8, losses
    assert sorted((pretrained["run"] / "reconstructions").glob("*.png"))  # its previews were written


def test_probe_knn_and_export_take_its_checkpoint(pretrained, tmp_path):
    cfg, encoder = pretrained["cfg"], pretrained["model"].encoder
    x = sample_images(4)
    pool, blocks = "mean", 2
    with torch.no_grad():
        reference = pooled_features(encoder, x, pool, blocks)
        probed, notes = frozen_encoder(cfg.model, str(pretrained["run"]))  # what linprobe.py and knn.py load
        torch.testing.assert_close(pooled_features(probed, x, pool, blocks), reference)
    out = tmp_path / "encoder.safetensors"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export_main([str(pretrained["run"]), str(out)]) == 0
    assert f"model = mpp.models.load_encoder('{out}')" in stdout.getvalue()
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["tokenizer"] == pretrained["tokenizer"] and "timm_model" not in meta  # timm has none of these
    assert json.loads(meta["mpp_config"])["model"]["tokenizer"] == pretrained["tokenizer"]
    rebuilt = load_encoder(out)
    assert type(rebuilt) is type(encoder) and not rebuilt.training
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(rebuilt, x, pool, blocks), reference)


def test_previews_of_each_encoder(pretrained):
    grid = reconstruction_grid(pretrained["model"], sample_images(3), MEAN, STD)
    assert grid is not None and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1


def test_fine_tuning_loads_its_checkpoint_and_trains_a_step(pretrained, tmp_path):
    from mpp import finetune
    from conftest import RECIPES
    # The pretraining run's model section (VT's names objective simmim: a model section never pairs vt with mae).
    overrides = [f"model.{o}" for o in TOKENIZER_SETTINGS[pretrained["tokenizer"]]] + PRETRAIN_SETTINGS[pretrained["tokenizer"]]
    args = [str(RECIPES / "finetune_quickstart.yaml"), f"data.train={SAMPLE_DATA}", f"ckpt={pretrained['run']}",
            "model.encoder=tiny", *overrides, "data.num_workers=0", "train.steps=2", "train.warmup_steps=1",
            "train.batch_size=16", "train.micro_batch_size=16", "data.batch_size=250", "log.trackers=[]",
            "log.peak_tflops=1", f"output_dir={tmp_path}", "resume=null", "checkpoint.every=100"]
    assert finetune.main(args) == 0
    report = json.loads((tmp_path / "finetune.json").read_text())
    assert report["step"] == 2 and report["count"] == 1000 and not any("kept at its init" in n for n in report["notes"])


def test_exported_timm_stem_hybrid_loads_into_timm(tmp_path, caplog):
    """A hybrid on timm's stem and R50 s16 layers exports to timm's vit_*_r50_s16_224, loaded strictly."""
    from mpp.config import PretrainConfig
    from mpp.recipe import load_config, save_config
    from conftest import QUICKSTART
    from safetensors.torch import save_file
    cfg = load_config(PretrainConfig, QUICKSTART, ["model.tokenizer=hybrid", "model.patch_size=16"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).eval()
    run = tmp_path / "ckpt"
    run.mkdir()
    save_file({f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, str(run / "model.safetensors"))
    save_config(cfg, run / "config.yaml")
    out = tmp_path / "hybrid.safetensors"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export_main([str(run), str(out)]) == 0
    (line,) = [l for l in stdout.getvalue().splitlines() if l.strip().startswith("model = timm.create_model(")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm"):
        model = eval(line.split("model = ", 1)[1], {"timm": timm}).eval()
    assert not [r for r in caplog.records if "Missing keys" in r.getMessage() or "Unexpected keys" in r.getMessage()]
    x = sample_images(2)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), encoder.forward_features(x))
