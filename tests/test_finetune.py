"""Fine-tuning on the shipped CIFAR-10 shards, on the CPU: from a short pretraining checkpoint at another
resolution, exact evaluation counts, stop/resume through the shared engine, layer-wise lr decay, and the
errors a user can fix (another patch size, mixup with an odd batch)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SAMPLE_DATA, checkpoint_steps, quick_config, read_metrics, run_train, subprocess_env
from mpp import finetune
from mpp.analyze import main as analyze_main
from mpp.config import FinetuneRunConfig
from mpp.recipe import ConfigError, load_config

RECIPE = REPO / "recipes" / "finetune_quickstart.yaml"


def ft_overrides(output_dir, *extra: str) -> list[str]:
    """Small, fast fine-tuning settings on the sample shards; `extra` come last, so they win."""
    return [f"data.train={SAMPLE_DATA}", "model.encoder=tiny", "model.img_size=32", "model.patch_size=4",
            "train.batch_size=16", "train.micro_batch_size=16", "train.warmup_steps=1", "data.num_workers=0",
            "data.shuffle_buffer=100", "data.batch_size=250", "log.every=1", "log.trackers=[]",
            "log.peak_tflops=1", "finetune.rand_augment=null", f"output_dir={output_dir}", "resume=null", *extra]


def ft_config(output_dir, *extra: str) -> FinetuneRunConfig:
    return load_config(FinetuneRunConfig, RECIPE, ft_overrides(output_dir, *extra))


def run_finetune(cfg):
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return finetune.train(cfg)
    finally:
        left = [sig.name for sig, handler in saved.items() if signal.getsignal(sig) is not handler]
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        assert not left, f"finetune.train() left its own handlers for {left} installed"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 1-step pretraining run (ViT-Tiny/4 at 32 px): its run folder."""
    out = tmp_path_factory.mktemp("pretrain")
    run_train(quick_config(out, "train.steps=1", "train.warmup_steps=0", "log.every=1"))
    assert checkpoint_steps(out) == [1]
    return out


@pytest.fixture(scope="module")
def small_val(tmp_path_factory):
    """The first 37 images of the sample's val split as one uncompressed shard (no manifest: the evaluation
    loader counts them): an odd count that leaves padding in the last batch of every process."""
    path = tmp_path_factory.mktemp("val") / "val-small.tar"
    with tarfile.open(SAMPLE_DATA / "val-000000.tar.gz") as src, tarfile.open(path, "w") as dst:
        for member in src:
            if int(member.name.split("_")[1].split(".")[0]) >= 37:
                break
            dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
    return path


def test_finetune_at_another_resolution_counts_every_val_image_once(pretrained, tmp_path):
    # 48 px from a 32 px pretraining: the position embeddings are resampled (8x8 -> 12x12 patches).
    cfg = ft_config(tmp_path, f"ckpt={pretrained}", "model.img_size=48", "train.steps=1", "log.attention_every=1",
                    "log.attention_images=4")
    model = run_finetune(cfg)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 192) and model.pos_embed.requires_grad
    assert model.head.out_features == 10  # num_classes null: the manifest's 10 classes

    report = json.loads((tmp_path / "finetune.json").read_text())
    assert report["num_eval"] == report["count"] == 1000  # the sample's val split, each image once
    assert 0 <= report["top1"] <= report["top5"] <= 1 and report["step"] == 1
    assert any("resampled" in n and "8x8" in n and "12x12" in n for n in report["notes"]), report["notes"]
    assert report["config"]["model"]["img_size"] == 48 and report["ckpt"] == str(pretrained)

    records = read_metrics(tmp_path)
    evals = [r for r in records if "val_top1" in r]
    assert [(r["step"], r["val_count"]) for r in evals] == [(1, 1000)]
    assert evals[0]["val_top1"] == report["top1"]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1] and 0 < train_records[0]["loss"] < 10
    assert train_records[0]["img_per_s"] > 0
    (attention,) = [r for r in records if "attention_distance_0" in r]
    diagonal = 11 * 4 * 2 ** 0.5  # the farthest patch centres of the 12 x 12 grid
    assert attention["step"] == 1 and all(0 < attention[f"attention_distance_{i}"] < diagonal for i in range(12))

    # The fine-tuned weights analysed: its learned positions on the 12 x 12 grid, no pretraining head to reconstruct.
    out = tmp_path / "analysis"
    assert analyze_main([str(tmp_path), "--out", str(out), "--images", "4", "--show", "1"]) == 0
    similarity = json.loads((out / "pos_embed_similarity.json").read_text())["checkpoints"][0]
    assert torch.tensor(similarity["similarity"]).shape == (144, 144)
    positions = model.pos_embed.detach()[0, 1:]
    direct = torch.nn.functional.normalize(positions, dim=-1) @ torch.nn.functional.normalize(positions, dim=-1).T
    assert torch.allclose(torch.tensor(similarity["similarity"]), direct, atol=1e-4)
    assert "skipped" in json.loads((out / "reconstructions.json").read_text())["checkpoints"][0]


def test_stopped_run_resumes_at_the_next_step_with_its_ema(pretrained, small_val, tmp_path, monkeypatch, capsys):
    args = [f"ckpt={pretrained}", "train.steps=4", f"data.val={small_val}", "data.batch_size=8",
            "finetune.ema=true", "finetune.ema_decay=0.5", "checkpoint.every=100", "resume=auto"]
    # SIGTERM arrives while step 2 reads its batch: the step finishes, is checkpointed, and the run returns.
    calls = []
    real = finetune.checked_labels

    def labels_then_stop(labels, valid, num_classes, spec):
        calls.append(spec)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(labels, valid, num_classes, spec)

    monkeypatch.setattr(finetune, "checked_labels", labels_then_stop)
    run_finetune(ft_config(tmp_path, *args))
    assert "stopped by signal at step 2" in "".join(capsys.readouterr())
    assert checkpoint_steps(tmp_path) == [2]
    assert not (tmp_path / "finetune.json").exists()  # written only by a complete run
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    saved = json.loads((ckpt / "state.json").read_text())
    assert saved["run"]["step"] == 2
    assert (saved["loader"]["epoch"], saved["loader"]["batches"]) == (0, 2)
    ema = load_file(ckpt / "ema.safetensors")  # the EMA is checkpointed with the run
    assert "module.pos_embed" in ema
    assert [p.name for p in ckpt.glob("*.pkl")] == ["random_states_0.pkl"]  # no pickled state but the RNG's

    monkeypatch.setattr(finetune, "checked_labels", real)
    model = run_finetune(ft_config(tmp_path, *args, "checkpoint.every=1"))
    assert re.search(r"resumed\b.*\bat step 2\b", "".join(capsys.readouterr()))
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4]  # none lost, none repeated
    assert checkpoint_steps(tmp_path) == [3, 4]  # keep 2
    report = json.loads((tmp_path / "finetune.json").read_text())
    assert report["step"] == 4 and report["num_eval"] == 37 and report["ema"]["count"] == 37
    # The EMA went on from the checkpoint's average: step 3's is half step 2's and half step 3's weights.
    step3 = tmp_path / "checkpoints" / "step_00000003"
    ema3 = load_file(step3 / "ema.safetensors")
    weights3 = load_file(step3 / "model.safetensors")
    for key in ("head.weight", "blocks.11.mlp.fc2.weight", "pos_embed"):
        expected = 0.5 * ema[f"module.{key}"] + 0.5 * weights3[key]
        torch.testing.assert_close(ema3[f"module.{key}"], expected)
        assert not torch.equal(ema3[f"module.{key}"], weights3[key])
    assert model.head.weight.shape == (10, 192)


def test_checkpoint_of_another_patch_size_names_both_shapes(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    code = finetune.main([str(RECIPE), *ft_overrides(out, f"ckpt={pretrained}", "model.patch_size=8")])
    message = capsys.readouterr().err
    assert code == 1, message
    assert "patch_embed.proj.weight" in message and "(192, 3, 4, 4)" in message and "(192, 3, 8, 8)" in message
    assert "model.patch_size=4" in message
    assert not out.exists()  # refused before anything was written


def test_layer_decay_scales_each_blocks_lr():
    cfg = load_config(FinetuneRunConfig, RECIPE, ["model.encoder=tiny", "finetune.layer_decay=0.5"])
    model = finetune.build_classifier(cfg, num_classes=10)
    optimizer = finetune.build_optimizer(cfg, model, lr=1e-3, device=torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(scale) == set(names.values())  # every parameter, pos_embed included, is trained
    depth = len(model.blocks)
    for i in range(depth):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - i))
        assert scale[f"blocks.{i}.norm1.weight"] == pytest.approx(0.5 ** (depth - i))
    for stem in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert scale[stem] == pytest.approx(0.5 ** (depth + 1))
    for top in ("fc_norm.weight", "head.weight", "head.bias"):
        assert scale[top] == 1.0
    assert decay["head.weight"] == decay["blocks.3.mlp.fc1.weight"] == cfg.optim.weight_decay
    assert decay["pos_embed"] == decay["cls_token"] == decay["blocks.3.norm1.bias"] == 0.0
    # The schedule sets each group's lr to the scheduled lr times its scale.
    from mpp.lr_schedule import cosine_schedule
    scheduler = cosine_schedule(optimizer, total_steps=10, warmup_steps=2, min_lr=0.0)
    scheduler.step_update(2)  # end of warm-up: the peak lr
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_mixup_with_an_odd_batch_fails_clearly(tmp_path, capsys):
    out = tmp_path / "run"
    code = finetune.main([str(RECIPE), *ft_overrides(out, "ckpt=none", "finetune.mixup=0.8",
                                                      "train.batch_size=15", "train.micro_batch_size=15")])
    message = capsys.readouterr().err
    assert code == 2, message
    assert "train.micro_batch_size" in message and "even" in message and "15" in message
    assert "finetune.mixup=0" in message
    assert not out.exists()
    with pytest.raises(ConfigError, match="ckpt=none"):  # an unset ckpt says what to pass
        finetune.train(ft_config(out, "ckpt=null"))


@torch.no_grad()
def reference_scores(cfg, images) -> tuple[int, int]:
    """Top-1 and top-5 hits of the model fine-tuning starts from, computed here, plainly, in fp32."""
    from accelerate.utils import set_seed
    from mpp.data import ShardLoader, normalizer
    from mpp.weights import load_into_vit
    set_seed(cfg.seed)  # as finetune.train does before building the model
    model = finetune.build_classifier(cfg, num_classes=10)
    load_into_vit(model, cfg.ckpt)
    model.eval()
    loader = ShardLoader(images, mode="eval", batch_size=64, img_size=32, crop_pct=cfg.data.crop_pct, num_workers=0)
    (batch,) = list(loader)
    valid = batch["valid"]
    logits = model(normalizer(cfg.data.mean, cfg.data.std, "cpu")(batch["image"]))[valid]
    hits = logits.topk(5, dim=1).indices == batch["label"][valid][:, None]
    assert int(valid.sum()) == 37
    return int(hits[:, 0].sum()), int(hits.any(1).sum())


def test_two_process_evaluation_counts_each_image_once(pretrained, small_val, tmp_path):
    # lr 0: the weights stay the checkpoint's (and the seeded head's); fp32: the near-zero head's logits
    # must not be rounded to bf16 (they could tie differently from the fp32 reference).
    args = [f"ckpt={pretrained}", "train.steps=1", f"data.val={small_val}", "data.batch_size=8", "optim.base_lr=0",
            "train.batch_size=32", "train.mixed_precision=no", "finetune.ema=true"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(REPO / "mpp" / "finetune.py"), str(RECIPE), *ft_overrides(tmp_path, *args)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "on 2 process(es)" in output, output[-4000:]
    report = json.loads((tmp_path / "finetune.json").read_text())
    # 37 images over 2 processes in batches of 8: 19 + 18, each padded to 24; the padding is not counted.
    assert report["num_eval"] == report["ema"]["count"] == 37
    top1, top5 = reference_scores(ft_config(tmp_path, *args), small_val)
    assert (report["top1"], report["top5"]) == (top1 / 37, top5 / 37)
    assert report["ema"]["top1"] == report["top1"]  # lr 0: the average is the model
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1]  # one process wrote the log


def test_rand_augment_posterize_at_full_magnitude_gives_black_not_an_error():
    # rand-m9-mstd0.5-inc1 draws magnitude 10 about once in 50 ops: posterize then keeps 0 bits, which Pillow
    # refuses; the sample must still be augmented, not dropped as unreadable.
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    from mpp.data.decode import TimmTransform
    transform = TimmTransform(32, (0.5,) * 3, (0.5,) * 3, training=True)
    ops = [op for t in transform.transform.transforms for op in getattr(t, "ops", [])]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))  # all black
    assert posterize.aug_fn(image, 1).getextrema() == ((128, 128), (0, 0), (0, 0))
    with pytest.raises(ValueError, match="bits"):  # what timm's own op does with this Pillow
        AugmentOp("PosterizeIncreasing").aug_fn(image, 0)
