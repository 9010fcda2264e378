"""kNN: DINO's weighted votes on hand-made features, the pooled features against timm's own forward,
the disk-cache fingerprint, `python mpp/knn.py` end to end on real images, and its errors.
(Exactness under 2-process DDP, with OnlineKnn: tests/test_linprobe.py.)"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, subprocess_env
from eval_subset import MODEL, fresh_accelerate_state, write_subset  # noqa: F401 (an autouse fixture)
from mpp.config import EvalConfig, KnnConfig, OnlineKnnConfig
from mpp.knn import OnlineKnn, knn_predict, main, run_knn, topk_accuracy
from mpp.recipe import ConfigError, from_dict

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_subset(tmp_path_factory.mktemp("knn_shards"), train=64, val=24, shard_size=40)


def recipe(tmp_path, shards, **sections) -> str:
    data = {"model": MODEL, "data": {"train": str(shards), "num_workers": 0, "batch_size": 16},
            "knn": {"k": 5}, "mixed_precision": "no", **sections}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---- the vote ----

def test_knn_predict_gives_the_weighted_votes_of_the_k_nearest():
    # unit vectors at angles; the second bank row is scaled (cosine ignores length)
    bank = torch.tensor([[1.0, 0.0], [8.0, 6.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    queries = torch.tensor([[2.0, 0.0], [-0.6, 0.8]])
    T = 0.5
    scores = knn_predict(bank, labels, queries, k=3, temperature=T, num_classes=4)
    # query 0: cosines 1, 0.8, 0, -1 -> neighbours 0 (class 0), 1 (class 0), 2 (class 1)
    # query 1: cosines -0.6, 0, 0.8, 0.6 -> neighbours 2 (class 1), 3 (class 2), 1 (class 0)
    expected = torch.tensor([[math.exp(1 / T) + math.exp(0.8 / T), math.exp(0), 0, 0],
                             [math.exp(0 / T), math.exp(0.8 / T), math.exp(0.6 / T), 0]])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    assert scores.argmax(1).tolist() == [0, 1]
    # chunked queries, and k past the bank (all four vote), give the same scores per chunk
    torch.testing.assert_close(knn_predict(bank, labels, queries, 3, T, 4, chunk=1), scores)
    everyone = knn_predict(bank, labels, queries[:1], k=99, temperature=T, num_classes=4)
    torch.testing.assert_close(everyone, torch.tensor([[math.exp(2) + math.exp(1.6), 1.0, math.exp(-2), 0.0]]))


def test_topk_accuracy_counts_hits():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])
    # top-1 hits: rows 0 and 2; top-2 misses row 1 only (its label is ranked 2nd: hit) -> all but none
    assert topk_accuracy(scores, labels, ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}
    assert topk_accuracy(scores, labels) == {"top1": 0.5, "top5": 1.0}  # top-5 of 3 classes: all of them


# ---- the features ----

def test_pooled_features_are_the_final_norm_tokens_of_the_last_blocks():
    from mpp.features import pooled_features
    from mpp.models.vit import vit_encoder
    torch.manual_seed(0)
    vit = vit_encoder("tiny", 32, 4).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # timm's own forward: blocks, then the final norm
        cls = pooled_features(vit, x, "cls", 1)
        mean = pooled_features(vit, x, "mean", 1)
        two = pooled_features(vit, x, "mean", 2)
        before_last = vit.norm(vit.blocks[:-1](vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))))
    torch.testing.assert_close(cls, tokens[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1), rtol=0, atol=1e-5)
    assert two.shape == (3, 2 * 192)
    torch.testing.assert_close(two[:, 192:], mean, rtol=0, atol=1e-5)  # the last block comes last
    torch.testing.assert_close(two[:, :192], before_last[:, 1:].mean(1), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="features.blocks=13.*12 blocks"):
        pooled_features(vit, x, "cls", 13)


def test_fingerprint_follows_what_the_features_depend_on(shards, tmp_path):
    from mpp.config import FeatureConfig, ModelConfig
    from mpp.data import ShardLoader
    from mpp.feature_cache import feature_fingerprint

    model = from_dict(ModelConfig, MODEL)
    loader = ShardLoader(str(shards), mode="eval", split="val", batch_size=8, img_size=32, num_workers=0,
                         rank=0, world_size=1)
    mean, std = [0.5] * 3, [0.25] * 3
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)

    def fp(ckpt=str(weights), pool="cls", crop=loader, m=mean, precision="no", seed=0):
        return feature_fingerprint(ckpt, model, crop, m, std, FeatureConfig(pool=pool), precision, seed)

    base = fp()
    assert fp() == base
    other_crop = ShardLoader(str(shards), mode="eval", split="val", batch_size=8, img_size=32, num_workers=0,
                             rank=0, world_size=1, crop_pct=1.0)
    train_split = ShardLoader(str(shards), mode="eval", split="train", batch_size=8, img_size=32, num_workers=0,
                              rank=0, world_size=1)
    changed = [fp(pool="mean"), fp(crop=other_crop), fp(crop=train_split), fp(m=[0.4] * 3), fp(precision="bf16"),
               fp(ckpt="none")]
    assert base not in changed and len(set(changed)) == len(changed)
    assert fp(ckpt="none", seed=1) != fp(ckpt="none")
    weights.write_bytes(b"y" * 11)  # the checkpoint was overwritten: its features are stale
    assert fp() != base


# ---- the script ----

def test_knn_script_writes_knn_json_and_reuses_disk_features(shards, tmp_path, capsys):
    out = tmp_path / "out"
    path = recipe(tmp_path, shards, probe={"cache": "disk"})
    result = subprocess.run([sys.executable, str(REPO / "mpp" / "knn.py"), path, "ckpt=none", f"output_dir={out}"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "knn.json").read_text())
    assert report["num_eval"] == 24 and report["num_train"] == 64 and report["num_classes"] == 10
    assert 0 <= report["top1"] <= report["top5"] <= 1
    assert report["ckpt"] == "none" and report["k"] == 5 and report["feature_dim"] == 192
    assert report["config"]["data"]["train"] == str(shards)
    assert any("randomly initialised" in n for n in report["notes"])
    cached = sorted(p.name.split("-")[0] for p in (out / "features").glob("*.pt"))
    assert cached == ["train", "val"]

    again = run_knn(from_dict(EvalConfig, yaml.safe_load(open(path)) | {"ckpt": "none", "output_dir": str(out),
                                                                         "probe": {"cache": "disk"}}))
    assert capsys.readouterr().out.count("(cached)") == 2
    assert {k: again[k] for k in ("top1", "top5", "num_eval")} == {k: report[k] for k in ("top1", "top5", "num_eval")}


def test_knn_without_ckpt_says_how_to_pass_one(shards, tmp_path, capsys):
    assert main([recipe(tmp_path, shards), f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ckpt is not set") and "ckpt=PATH" in err and "ckpt=none" in err
    assert not (tmp_path / "out").exists()


def test_knn_with_missing_checkpoint_names_it(shards, tmp_path, capsys):
    assert main([recipe(tmp_path, shards), f"ckpt={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'out'}"]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_online_knn_needs_labelled_shards():
    from accelerate import Accelerator
    from mpp.config import ModelConfig
    with pytest.raises(ConfigError, match="knn.data.train"):
        OnlineKnn(OnlineKnnConfig(every=10), from_dict(ModelConfig, MODEL), Accelerator(cpu=True), 0)


def test_online_knn_restores_modes_and_counts_every_sample(shards):
    from accelerate import Accelerator
    from mpp.config import LabelledDataConfig, ModelConfig
    from mpp.models import build_model
    model_cfg = from_dict(ModelConfig, {**MODEL, "decoder": {"dim": 64, "depth": 1, "heads": 2}})
    data = LabelledDataConfig(train=str(shards), num_workers=0, batch_size=10)
    online = OnlineKnn(OnlineKnnConfig(every=1, data=data, knn=KnnConfig(k=3)), model_cfg, Accelerator(cpu=True), 0)
    mae = build_model(model_cfg).train()
    mae.encoder.blocks[0].eval()  # a mixed state, as a model in the middle of something may have
    modes = {name: m.training for name, m in mae.named_modules()}
    result = online.run(mae)  # the MAE itself: its .encoder is used
    assert set(result) == {"knn_top1", "knn_top5"} and 0 <= result["knn_top1"] <= result["knn_top5"] <= 1
    assert {name: m.training for name, m in mae.named_modules()} == modes
    assert online.num_classes == 10 and online.counts == {"bank": 64, "eval": 24}
    assert (result["knn_top1"] * 24).is_integer()
    assert not any(p.grad is not None for p in mae.parameters())


def test_pretraining_logs_online_knn_every_n_steps_and_at_the_end(shards, tmp_path):
    from conftest import quick_config, run_train
    cfg = quick_config(tmp_path, "train.steps=3", "log.every=1", "knn.every=2", f"knn.data.train={shards}",
                       "knn.data.num_workers=0", "knn.data.batch_size=16", "knn.data.crop_pct=1.0")
    run_train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 3]  # every 2 steps, and after the last
    for r in knn:  # fractions of the 24 val samples
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 1
        assert round(r["knn_top1"] * 24, 6) == int(round(r["knn_top1"] * 24))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
