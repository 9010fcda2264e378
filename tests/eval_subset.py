"""Small labelled shard sets cut from the shipped CIFAR-10 sample, for fast probe and kNN tests.

`write_subset(out, train=N, val=M)` writes the first N train and M val samples (real JPEGs and
labels) as uncompressed shards of at most `shard_size` samples, with a data_tools-style
manifest.json (classes, per-shard counts), and returns `out`. Also what the evaluation tests share:
MODEL (the encoder they evaluate) and the autouse fixture `fresh_accelerate_state` (import it).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import SAMPLE_DATA

MODEL = {"encoder": "tiny", "img_size": 32, "patch_size": 4}  # the encoder the evaluation tests evaluate


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run makes its Accelerator with its own precision; accelerate keeps one state per process."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _samples(split: str, count: int):
    from mpp.data.shards import read_slice, resolve_shards
    shards = resolve_shards(str(SAMPLE_DATA), split)
    left = count
    for url, n in zip(shards.urls, shards.counts):
        take = min(n, left)
        yield from read_slice(url, 0, take)
        left -= take
        if not left:
            return


def write_subset(out: Path, *, train: int, val: int, shard_size: int = 1000) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((SAMPLE_DATA / "manifest.json").read_text())
    splits = {}
    for split, count in (("train", train), ("val", val)):
        samples = list(_samples(split, count))
        assert len(samples) == count, (split, len(samples))
        shards = []
        for i in range(0, count, shard_size):
            name = f"{split}-{i // shard_size:06d}.tar"
            chunk = samples[i:i + shard_size]
            with tarfile.open(out / name, "w") as tar:
                for sample in chunk:
                    for field, data in sample.items():
                        if field.startswith("__"):
                            continue
                        info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            shards.append({"name": name, "num_samples": len(chunk)})
        splits[split] = {"num_samples": count, "shards": shards}
    (out / "manifest.json").write_text(json.dumps({"format": manifest["format"], "classes": manifest["classes"],
                                                   "splits": splits}))
    return out
