"""The loader under real two-process CPU DDP (accelerate launch --multi_gpu --num_processes 2, gloo).

One launch runs every scenario (tests/ddp_loader_check.py): training epochs over shard counts that
do not divide evenly among 2 ranks x 2 workers, with batches that do not divide the shard size, and
evaluation epochs gathered across the ranks. The shipped CIFAR-10 sample always; shards written by
data_tools from ../shared/datasets when that folder is there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_DATA, subprocess_env

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR_TEST = SHARED / "cifar10" / "test.tar"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_loader")
    scenarios = [
        # 5 shards of 1000, 2 ranks x 2 workers, batch 48: 52 batches per rank (26 + 26), 8 samples dropped
        {"name": "sample_train", "spec": str(SAMPLE_DATA), "mode": "pretrain", "batch": 48, "workers": 2},
        # 1000 samples, 500 per rank: 11 batches of 48 each, the last padded
        {"name": "sample_eval", "spec": str(SAMPLE_DATA), "split": "val", "mode": "eval", "batch": 48, "workers": 2},
        # one shard for 2 ranks x 3 workers
        {"name": "one_shard_train", "spec": [str(SAMPLE_DATA / "val-000000.tar.gz")], "mode": "probe", "batch": 20,
         "workers": 3, "num_samples": 1000},
    ]
    real = None
    if CIFAR_TEST.is_file():
        real = tmp / "cifar_shards"
        made = subprocess.run([sys.executable, "-m", "data_tools.shard", str(CIFAR_TEST), str(real),
                               "--prefix", "train", "--per-class", "45", "--shard-size", "70"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-3000:]
        # 450 samples in 7 shards (6 x 70 + 30); batch 16: 14 per rank (7 + 7 per worker); eval: 225 per rank
        scenarios += [{"name": "real_train", "spec": str(real), "mode": "pretrain", "batch": 16, "workers": 2},
                      {"name": "real_eval", "spec": str(real), "mode": "eval", "batch": 16, "workers": 2}]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(REPO / "tests" / "ddp_loader_check.py"), str(tmp / "out"), json.dumps(scenarios)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ranks = [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, real


def keys_of(split: str, count: int) -> list[str]:
    return [f"{split}_{i:08d}" for i in range(count)]


def check_training(ranks, name, batches, batch_size, universe):
    recs = [r[name] for r in ranks]
    assert [(r["rank"], r["world_size"]) for r in recs] == [(0, 2), (1, 2)]
    assert [len(r["batches"]) for r in recs] == [batches, batches] == [r["len"] for r in recs]
    assert all(len(b) == batch_size for r in recs for b in r["batches"])
    per_rank = [[k for b in r["batches"] for k in b] for r in recs]
    assert all(len(keys) == len(set(keys)) for keys in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint samples per rank within the epoch
    assert set(per_rank[0]) | set(per_rank[1]) <= set(universe)


def check_eval(ranks, name, batches, universe):
    recs = [r[name] for r in ranks]
    assert [len(r["batches"]) for r in recs] == [batches, batches]
    valid = Counter(k for r in recs for b, v in zip(r["batches"], r["valid"]) for k, ok in zip(b, v) if ok)
    assert sorted(valid) == sorted(universe) and set(valid.values()) == {1}  # every key exactly once
    for r in recs:  # what an evaluation loop gathers: the same on every rank, every key once
        assert sorted(r["gathered"]) == sorted(universe)


def test_ddp_training_epochs_have_equal_batch_counts_and_disjoint_ranks(ddp_run):
    ranks, _ = ddp_run
    check_training(ranks, "sample_train", 5000 // 96, 48, keys_of("train", 5000))
    check_training(ranks, "one_shard_train", 1000 // 40, 20, keys_of("val", 1000))


def test_ddp_evaluation_covers_every_key_exactly_once(ddp_run):
    ranks, _ = ddp_run
    check_eval(ranks, "sample_eval", 11, keys_of("val", 1000))


@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason=f"needs {CIFAR_TEST} (the shared data sets)")
def test_ddp_on_real_data_tools_shards(ddp_run):
    ranks, real = ddp_run
    manifest = json.loads((real / "manifest.json").read_text())
    counts = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    assert counts == [70] * 6 + [30]
    check_training(ranks, "real_train", 450 // 32, 16, keys_of("train", 450))
    check_eval(ranks, "real_eval", 15, keys_of("train", 450))
