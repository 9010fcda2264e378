"""mpp.weights (any stage's weights into a timm ViT) and mpp.export (a file timm.create_model loads).

One short pretraining run on the shipped CIFAR-10 sample gives a real checkpoint (module fixture);
features are compared on real images from the sample's val shard.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from conftest import REPO, SAMPLE_DATA, quick_config, run_train, subprocess_env
from mpp.checkpoint import list_checkpoints
from mpp.data import normalizer, preview_images, resolve_shards
from mpp.export import main as export_main
from mpp.models import vit_encoder
from mpp.weights import decoder_state, load_into_vit, model_state, read_weights, vit_state


# ---- fixtures: one real checkpoint, its export, real images ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = quick_config(out, "train.steps=2", "train.warmup_steps=1", "log.image_every=1000")
    mae = run_train(cfg).eval()  # the trained MAE, set to exactly its final checkpoint below
    ckpt = list_checkpoints(out)[-1]
    mae.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    return dict(run=out, ckpt=ckpt, cfg=cfg, mae=mae)


def run_export(*argv) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = export_main([str(a) for a in argv])
    return code, stdout.getvalue()


def printed_command(stdout: str) -> str:
    (line,) = [l for l in stdout.splitlines() if l.strip().startswith("model = timm.create_model(")]
    return line.split("model = ", 1)[1]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "vit_tiny_4_32.safetensors"
    code, stdout = run_export(trained["run"], out)
    assert code == 0, stdout
    return dict(file=out, stdout=stdout, command=printed_command(stdout))


@pytest.fixture(scope="module")
def images(trained):
    """8 real val images, normalised as in pretraining, (8, 3, 32, 32) float32."""
    url = resolve_shards(str(SAMPLE_DATA), "val").urls[0]
    data = trained["cfg"].data
    return normalizer(data.mean, data.std, "cpu")(preview_images(url, 32, count=8))


def timm_from_command(command: str, caplog) -> torch.nn.Module:
    """Run the printed call; timm's loader must report no missing or unexpected keys."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm"):
        model = eval(command, {"timm": timm})
    complaints = [r.getMessage() for r in caplog.records if "Missing keys" in r.getMessage()
                  or "Unexpected keys" in r.getMessage()]
    assert not complaints, complaints
    assert any("Loading pretrained weights from file" in r.getMessage() for r in caplog.records)
    return model.eval()


def bare(size: str, img_size: int, patch: int, **kwargs) -> VisionTransformer:
    """vit_encoder without timm's weight initialisation (seconds on a busy 2-core CPU), for models whose
    weights are all loaded or set by the test."""
    return vit_encoder(size, img_size, patch, weight_init="skip", **kwargs)


def randomize(model: torch.nn.Module) -> None:
    """Distinct random weights everywhere (LayerNorm scales around 1), so a weight loaded from the wrong
    place would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_one = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if scale_one else 0.0))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---- export -> timm ----

def test_export_loads_into_timm_strictly_with_equal_features(trained, exported, images, caplog):
    command = exported["command"]
    assert command.startswith("timm.create_model('vit_tiny_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(")
    assert command.endswith("num_classes=0, img_size=32, patch_size=4)")
    assert f"file='{exported['file']}'" in command
    model = timm_from_command(command, caplog)
    assert isinstance(model, VisionTransformer) and model.patch_embed.proj.weight.shape == (192, 3, 4, 4)

    # The file's keys are exactly the model's: nothing was left at timm's random initialisation.
    saved = load_file(str(exported["file"]))
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key

    # timm's preprocessing config follows what the encoder was trained on.
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, 32, 32)
    assert list(data["mean"]) == trained["cfg"].data.mean and list(data["std"]) == trained["cfg"].data.std

    mae = trained["mae"]
    with torch.no_grad():
        ours = mae.encode(mae.encoder.add_positions(mae.encoder.embed(images)))
        theirs = model.forward_features(images)
        pooled = model.forward_head(theirs, pre_logits=True)
    assert theirs.shape == (8, 65, 192) and pooled.shape == (8, 192)
    assert max_diff(ours, theirs) < 1e-5
    assert max_diff(ours[:, 0], pooled) < 1e-5  # timm's default pooling is the class token
    assert ours.std().item() > 0.1  # real, non-degenerate features


def test_printed_command_loads_strictly(exported, tmp_path):
    """The call sets pretrained_cfg num_classes equal to the model's, so timm loads strictly: a stray or a
    missing key fails instead of being logged (so the previous test's clean load means an exact key match)."""
    state = load_file(str(exported["file"]))
    state["blocks.0.surplus"] = torch.zeros(3)
    del state["blocks.3.mlp.fc1.bias"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*blocks\.3\.mlp\.fc1\.bias.*Unexpected key.*blocks\.0\.surplus"):
        eval(exported["command"].replace(str(exported["file"]), str(broken)), {"timm": timm})


def test_export_metadata_is_strings_and_names_the_model(trained, exported):
    with safe_open(str(exported["file"]), framework="pt") as f:
        meta = f.metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["timm_model"] == "vit_tiny_patch16_224"
    assert (meta["img_size"], meta["patch_size"], meta["in_chans"], meta["encoder"]) == ("32", "4", "3", "tiny")
    assert json.loads(meta["timm_kwargs"]) == {"num_classes": 0, "img_size": 32, "patch_size": 4}
    assert meta["timm_command"] == exported["command"]
    saved_config = yaml.safe_load((trained["ckpt"] / "config.yaml").read_text())
    assert json.loads(meta["mpp_config"]) == saved_config
    assert read_weights(exported["file"])[1] == saved_config


def test_base16_at_224_needs_no_extra_kwargs(tmp_path, caplog):
    """An MAE-style .pth ({"model": MAE keys}) of ViT-B/16 at 224: timm's default shape, no img/patch kwargs."""
    torch.manual_seed(0)
    vit = bare("base", 224, 16).eval()  # PyTorch's default init, not timm's: only a real load makes them equal
    with torch.no_grad():
        vit.cls_token.normal_(std=0.02)
    pth = tmp_path / "mae_base.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in vit.state_dict().items()}
                | {"mask_token": torch.zeros(1, 1, 512)}}, pth)
    out = tmp_path / "base.safetensors"
    code, stdout = run_export(pth, out)
    assert code == 0, stdout
    command = printed_command(stdout)
    assert command == (f"timm.create_model('vit_base_patch16_224', pretrained=True, pretrained_cfg_overlay=dict("
                       f"file='{out}', custom_load=False, num_classes=0, input_size=(3, 224, 224)), num_classes=0)")
    model = timm_from_command(command, caplog)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(vit.forward_features(x), model.forward_features(x)) < 1e-5


def test_fine_tuned_state_exports_with_its_head_and_loads_headless(tmp_path, images, caplog):
    """A fine-tune-style state (timm keys, fc_norm + 10-class head, no norm) as a plain .pth."""
    torch.manual_seed(0)
    ft = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10,
                           global_pool="avg", weight_init="skip").eval()
    randomize(ft)
    pth = tmp_path / "finetuned.pth"
    torch.save(ft.state_dict(), pth)

    # Into a headless class-token encoder: fc_norm becomes its norm, the head is left out, with notes.
    enc = bare("tiny", 32, 4)
    notes = load_into_vit(enc, pth)
    assert any("fc_norm of the checkpoint loaded as the model's norm" in n for n in notes), notes
    assert any("classifier head (10 classes) is not used" in n for n in notes), notes
    assert torch.equal(enc.norm.weight, ft.fc_norm.weight) and torch.equal(enc.norm.bias, ft.fc_norm.bias)
    assert torch.equal(enc.blocks[11].mlp.fc2.weight, ft.blocks[11].mlp.fc2.weight)

    # Into a classifier of another class count: backbone loads, head kept (noted); same count + head=True: loaded.
    other = bare("tiny", 32, 4, global_pool="avg")
    other.reset_classifier(5)
    notes = load_into_vit(other, pth, head=True)
    assert any("does not fit" in n and "(10, 192) vs (5, 192)" in n for n in notes), notes
    same = bare("tiny", 32, 4, global_pool="avg")
    same.reset_classifier(10)
    assert "classifier head loaded (10 classes)" in load_into_vit(same, pth, head=True)
    assert torch.equal(same.head.weight, ft.head.weight) and torch.equal(same.fc_norm.bias, ft.fc_norm.bias)

    # Exported with its head: timm builds the avg-pool 10-class model and gives the same logits.
    out = tmp_path / "ft.safetensors"
    code, stdout = run_export(pth, out)
    assert code == 0, stdout
    command = printed_command(stdout)
    assert command.endswith("num_classes=10, global_pool='avg', img_size=32, patch_size=4)")
    model = timm_from_command(command, caplog)
    with torch.no_grad():
        assert max_diff(ft(images), model(images)) < 1e-5


# ---- loading into mpp ----

def test_every_form_of_output_loads_the_same_encoder(trained, exported, tmp_path, caplog):
    expected = {k[len("encoder."):]: v for k, v in load_file(str(trained["ckpt"] / "model.safetensors")).items()
                if k.startswith("encoder.")}
    # A checkpoint folder written with pytorch_model.bin (accelerate's safe_serialization=False), DDP-wrapped keys.
    bin_ckpt = tmp_path / "bin_ckpt"
    bin_ckpt.mkdir()
    torch.save({f"module.{k}": v for k, v in trained["mae"].state_dict().items()}, bin_ckpt / "pytorch_model.bin")
    shutil.copy(trained["ckpt"] / "config.yaml", bin_ckpt)
    with_decoder = tmp_path / "with_decoder.safetensors"
    code, stdout = run_export(trained["ckpt"], with_decoder, "--with-decoder")
    assert code == 0, stdout
    # timm takes the encoder from it too, non-strictly (the call says so): the decoder keys are its only surplus.
    command = printed_command(stdout)
    assert command.endswith("patch_size=4, pretrained_strict=False)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm"):
        model = eval(command, {"timm": timm})
    (surplus,) = [r.getMessage() for r in caplog.records if "Unexpected keys" in r.getMessage()]
    assert "decoder.head.mask_token" in surplus and "decoder.head.pred.weight" in surplus
    assert not any("Missing keys" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    sources = [trained["run"], trained["run"] / "checkpoints", trained["ckpt"], exported["file"], with_decoder, bin_ckpt]
    for source in sources:
        vit = bare("tiny", 32, 4)
        assert load_into_vit(vit, source) == [], source
        state = vit.state_dict()
        assert set(state) == set(expected)
        for key, value in expected.items():
            assert torch.equal(state[key], value), (source, key)
        assert not vit.pos_embed.requires_grad  # vit_encoder's fixed embedding stays fixed

    # --with-decoder round-trips the whole MAE: same weights, same reconstruction loss.
    state, _ = read_weights(with_decoder)
    assert set(decoder_state(state)) == {k for k in trained["mae"].state_dict() if not k.startswith("encoder.")}
    mae = copy.deepcopy(trained["mae"])
    with torch.no_grad():
        for p in mae.parameters():
            p.zero_()
    mae.load_state_dict(model_state(state), strict=True)
    for key, value in trained["mae"].state_dict().items():
        assert torch.equal(mae.state_dict()[key], value), key


def test_pos_embed_resampling(trained, exported, images, caplog):
    mae = trained["mae"]
    # Same size: nothing to adapt, features identical to the pretraining encoder's.
    same = bare("tiny", 32, 4).eval()
    assert load_into_vit(same, trained["ckpt"]) == []
    with torch.no_grad():
        assert max_diff(same.forward_features(images),
                        mae.encode(mae.encoder.add_positions(mae.encoder.embed(images)))) < 1e-5

    # 64 px (grid 16x16), trainable embedding as fine-tuning makes it: resampled, requires_grad kept.
    big = bare("tiny", 64, 4).eval()
    big.pos_embed.requires_grad_(True)
    notes = load_into_vit(big, trained["ckpt"])
    assert notes == ["pos_embed resampled bicubically from grid 8x8 to 16x16 (image size 64)"]
    assert big.pos_embed.requires_grad and big.pos_embed.shape == (1, 257, 192)
    # Exactly what timm's own loader makes of the exported file at img_size=64.
    timm_big = timm_from_command(exported["command"].replace("img_size=32", "img_size=64, weight_init='skip'"), caplog)
    assert torch.equal(timm_big.pos_embed, big.pos_embed.detach())
    # Consistent with the original grid: the class token's row is untouched, and each 2x2 block of the new
    # grid averages back to the original position's embedding (its nearest original row, cosine > 0.999).
    old = mae.encoder.pos_embed.detach()
    assert torch.equal(big.pos_embed[0, 0].detach(), old[0, 0])
    new_grid = big.pos_embed.detach()[0, 1:].reshape(16, 16, 192).permute(2, 0, 1)
    pooled = F.avg_pool2d(new_grid[None], 2)[0].flatten(1).T  # (64, 192) in raster order
    assert F.cosine_similarity(pooled, old[0, 1:]).min().item() > 0.999
    assert torch.equal(torch.cdist(pooled, old[0, 1:]).argmin(1), torch.arange(64))
    # And the encoder runs at the new size.
    with torch.no_grad():
        feats = big.forward_features(F.interpolate(images, size=64, mode="bilinear", align_corners=False))
    assert feats.shape == (8, 257, 192) and torch.isfinite(feats).all()


@pytest.mark.parametrize("size,img_size,patch,shapes,fix", [
    ("small", 32, 4, ["(192, 3, 4, 4) = width 192, 3 channels, patch 4", "(384, 3, 4, 4) = width 384"], "model.encoder=tiny"),
    ("tiny", 32, 8, ["(192, 3, 4, 4) = width 192, 3 channels, patch 4", "(192, 3, 8, 8) = width 192, 3 channels, patch 8"], "model.patch_size=4"),
    ("base", 224, 16, ["(192, 3, 4, 4)", "(768, 3, 16, 16) = width 768, 3 channels, patch 16"], "model.encoder=tiny, model.patch_size=4"),
])
def test_mismatched_checkpoint_names_both_shapes(trained, exported, size, img_size, patch, shapes, fix):
    for source in (trained["ckpt"], exported["file"]):  # the config comes from config.yaml / the file's metadata
        with pytest.raises(ValueError) as err:
            load_into_vit(bare(size, img_size, patch), source)
        message = str(err.value)
        assert message.startswith("patch_embed.proj.weight: checkpoint (192, 3, 4, 4)")
        for shape in shapes:
            assert shape in message
        assert f"set {fix}" in message
        assert "it was trained with model: encoder=tiny, img_size=32, patch_size=4" in message


def test_vit_state_keeps_the_encoder_submodule_of_any_stage():
    w = torch.zeros(1)
    # A pretraining model's state: its encoder is the `encoder` submodule; the objective's head, the block fusion
    # and the contrastive projector are pretraining's only. DDP's module. and compile's _orig_mod. come off.
    pretraining = {"module._orig_mod.encoder.blocks.0.attn.qkv.weight": w, "encoder.cls_token": w,
                   "head.mask_token": w, "head.embed.weight": w, "head.pred.bias": w, "module.projector.0.weight": w,
                   "fusion.proj.0.weight": w, "module.fusion.weights": w}
    assert set(vit_state(pretraining)) == {"blocks.0.attn.qkv.weight", "cls_token"}
    assert set(decoder_state(pretraining)) == {"head.mask_token", "head.embed.weight", "head.pred.bias",
                                               "fusion.proj.0.weight", "fusion.weights"}
    # A fine-tuned classifier or an export: timm keys already (head: the classifier); an export made with
    # --with-decoder carries the pretraining head under decoder.
    timm_keys = {"blocks.0.attn.qkv.weight": w, "cls_token": w, "head.weight": w, "_orig_mod.fc_norm.bias": w,
                 "decoder.head.pred.bias": w, "decoder.fusion.weights": w}
    assert set(vit_state(timm_keys)) == {"blocks.0.attn.qkv.weight", "cls_token", "head.weight", "fc_norm.bias"}
    assert set(decoder_state(timm_keys)) == {"head.pred.bias", "fusion.weights"}
    assert set(model_state(timm_keys)) == {"encoder.blocks.0.attn.qkv.weight", "encoder.cls_token",
                                           "encoder.head.weight", "encoder.fc_norm.bias", "head.pred.bias",
                                           "fusion.weights"}


def test_missing_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*not found; pass a checkpoint folder"):
        read_weights(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin and no checkpoint"):
        read_weights(tmp_path)  # an empty folder
    not_weights = tmp_path / "notes.pth"
    torch.save({"epoch": 3}, not_weights)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_weights(not_weights)
    # The command line: non-zero exit, one line on stderr naming the path, no traceback.
    proc = subprocess.run([sys.executable, "-m", "mpp.export", str(tmp_path / "nowhere"), str(tmp_path / "o.safetensors")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and lines[0].startswith("mpp.export: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("objective", ["mae", "simmim", "vit_mpp"])
def test_pretraining_head_and_fused_blocks_travel_with_the_decoder(objective):
    # --with-decoder's keys carry the objective's head and model.fuse_blocks' layers, so the whole pretraining
    # model comes back from an export; the encoder alone never holds them.
    from conftest import small_model
    from mpp.weights import DECODER_PREFIX
    overrides = [f"objective={objective}", "fuse_blocks=[2,7]"]
    torch.manual_seed(0)
    source = small_model(*overrides)
    state = source.state_dict()
    exported = {**vit_state(state), **{DECODER_PREFIX + k: v for k, v in decoder_state(state).items()}}  # export's keys
    assert {"decoder.fusion.weights", "decoder.fusion.proj.1.bias", "decoder.head.mask_token",
            "decoder.head.pred.weight"} <= set(exported)
    assert not any(k.startswith(("fusion", "head.")) for k in vit_state(state))
    torch.manual_seed(1)
    restored = small_model(*overrides)
    restored.load_state_dict(model_state(exported), strict=True)
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value), key
