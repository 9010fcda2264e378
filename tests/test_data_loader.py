"""The streaming loader (mpp.data): specs, the per-epoch plan, resume, bad data, decoding, transforms.

Most tests read the shipped CIFAR-10 sample (5 x 1000 training images in .tar.gz shards, 1000 val).
Ranks are simulated in one process here (rank=, world_size=); tests/test_data_ddp.py runs real DDP.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SAMPLE_DATA

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
from mpp.data import ShardLoader, decode_rgb, normalizer, resolve_shards
from mpp.data import decode as decode_module
from mpp.data.decode import (CropTransform, build_transform, decode_chw, draft_factor, jpeg_size,
                              random_resized_crop_box)
from mpp.data.loader import EpochPlan, split_batches
from mpp.data.shards import count_samples, read_slice

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_region_decoder = pytest.mark.skipif(
    decode_module._decode_crop is None,
    reason="mpp's region JPEG decoder (mpp/data/_jpegcrop.c) was not built: no libjpeg-turbo headers at install")
TRAIN_KEYS = 5000


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> str:
    """A manifest of two of the sample's shards (2000 samples): a shorter epoch for the tests that run many."""
    folder = tmp_path_factory.mktemp("two")
    write_manifest(folder, "train", [(str(SAMPLE_DATA / f"train-00000{i}.tar.gz"), 1000) for i in range(2)])
    return str(folder)


def loader(spec=SAMPLE_DATA, **kw) -> ShardLoader:
    args = dict(mode="pretrain", batch_size=32, img_size=16, num_workers=0, shuffle_buffer=200, seed=7)
    args.update(kw)
    return ShardLoader(spec, **args)


def epoch_keys(ld: ShardLoader) -> list[list[str]]:
    return [batch["key"] for batch in ld]


def flat(batches) -> list[str]:
    return [k for b in batches for k in b]


def sample_jpegs(count: int) -> list[tuple[str, bytes, bytes]]:
    """(key, jpg bytes, cls bytes) of the first `count` samples of the shipped val shard."""
    url = str(SAMPLE_DATA / "val-000000.tar.gz")
    return [(s["__key__"], s["jpg"], s["cls"]) for s, _ in zip(read_slice(url), range(count))]


def write_tar(path: Path, samples, gz: bool = False) -> dict:
    """Write samples [(key, {ext: bytes})] as a tar; returns {key: offset of its first member's header}."""
    starts = {}
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for key, files in samples:
            starts[key] = tar.offset
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return starts


def write_manifest(folder: Path, split: str, shards: list[tuple[str, int]]) -> None:
    manifest = {"format": "mpp-shards/1", "classes": [str(i) for i in range(10)],
                "splits": {split: {"num_samples": sum(n for _, n in shards),
                                   "shards": [{"name": name, "num_samples": n} for name, n in shards]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ---- sources ----

def test_spec_matching_nothing_fails_at_once_naming_it(tmp_path):
    for spec in [str(tmp_path / "train-{000000..000004}.tar"), str(tmp_path / "nothing.tar"), str(tmp_path)]:
        with pytest.raises(FileNotFoundError, match="matches no shard files") as err:
            ShardLoader(spec, batch_size=4, num_samples=10)
        assert repr(spec) in str(err.value)
    with pytest.raises(FileNotFoundError, match="has no split 'test'"):
        resolve_shards(str(SAMPLE_DATA), "test")


def test_specs_of_every_kind_resolve_to_the_same_shards(tmp_path):
    urls = [str(SAMPLE_DATA / f"train-{i:06d}.tar.gz") for i in range(5)]
    by_dir = resolve_shards(str(SAMPLE_DATA))
    assert by_dir.urls == urls and by_dir.counts == [1000] * 5 and by_dir.num_samples == TRAIN_KEYS
    assert resolve_shards(str(SAMPLE_DATA / "manifest.json")).urls == urls
    brace = resolve_shards(str(SAMPLE_DATA / "train-{000000..000004}.tar.gz"))
    assert brace.urls == urls and brace.counts is None
    assert resolve_shards(urls[:2] + [urls[2]]).urls == urls[:3]
    # a folder of shards without a manifest, and a wids shard index with relative urls
    for url in urls:
        shutil.copy(url, tmp_path)
    assert [Path(u).name for u in resolve_shards(str(tmp_path)).urls] == [Path(u).name for u in urls]
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1,
             "shardlist": [{"url": Path(u).name, "nsamples": 1000} for u in urls]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    wids = resolve_shards(str(tmp_path / "index.json"))
    assert wids.urls == [str(tmp_path / Path(u).name) for u in urls] and wids.num_samples == TRAIN_KEYS


def test_pipe_urls_and_counts(tmp_path):
    url = str(SAMPLE_DATA / "val-000000.tar.gz")
    local = [s["__key__"] for s in read_slice(url, 10, 5)]
    piped = [s["__key__"] for s in read_slice(f"pipe:cat {url}", 10, 5)]
    assert local == piped == [f"val_{i:08d}" for i in range(10, 15)]
    assert count_samples(url) == 1000
    # A spec of pipe: URLs, without a manifest: data.num_samples says how many samples it holds.
    ld = loader([f"pipe:cat {SAMPLE_DATA}/train-00000{i}.tar.gz" for i in range(2)], num_samples=2000, batch_size=100)
    assert len(ld) == 20 and len(set(flat(epoch_keys(ld)))) == 2000
    with pytest.raises(ValueError, match="data.num_samples"):
        loader(str(SAMPLE_DATA / "train-{000000..000001}.tar.gz"))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s):// URLs through curl")
def test_http_manifest_and_shards():
    handler = functools.partial(QuietHandler, directory=str(SAMPLE_DATA))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
            ld = loader(url, mode="eval", split="val", batch_size=100, num_workers=2)
            assert ld.urls == [url.replace("manifest.json", "val-000000.tar.gz")]
            keys = flat(epoch_keys(ld))
            assert sorted(keys) == [f"val_{i:08d}" for i in range(1000)] and ld.totals["bad"] == 0
        finally:
            server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ---- the plan: equal batch counts, disjoint ranks, a pure function of its inputs ----

@pytest.mark.parametrize("counts", [[1000] * 5, [90, 90, 90, 90, 90, 30], [7], [500, 3, 250, 1]])
@pytest.mark.parametrize("world,workers,batch", [(1, 1, 32), (2, 2, 48), (3, 4, 7), (8, 3, 5)])
def test_plan_gives_every_rank_the_same_batches_and_disjoint_samples(counts, world, workers, batch):
    urls = [f"s{i}.tar" for i in range(len(counts))]
    total = sum(counts)
    for training in (True, False):
        plans = [EpochPlan(urls, counts, epoch=3, seed=1, rank=r, world_size=world, workers=workers,
                           batch_size=batch, training=training) for r in range(world)]
        assert len({p.batches for p in plans}) == 1
        n = plans[0].batches
        covered = Counter()
        for p in plans:
            assert [w.batches for w in p.worker_plans] == split_batches(n, workers)
            assert sum(w.batches for w in p.worker_plans) == n
            for w in p.worker_plans:
                assert sum(s.take for s in w.slices) == w.samples <= w.batches * batch
                for s in w.slices:
                    covered.update((s.url, i) for i in range(s.skip, s.skip + s.take))
        assert all(v == 1 for v in covered.values())  # no sample planned twice, on any rank or worker
        if training:
            assert n == total // (world * batch) and sum(covered.values()) == n * world * batch
        else:
            assert n == -(-(-(-total // world)) // batch) and sum(covered.values()) == total
            assert max(p.rank_len for p in plans) - min(p.rank_len for p in plans) <= 1


def test_order_is_a_pure_function_of_seed_epoch_rank_world_workers(two_shards):
    first = epoch_keys(loader(two_shards))
    assert epoch_keys(loader(two_shards)) == first  # same arguments, same keys, batch for batch
    ld = loader(two_shards)
    ld.set_epoch(1)
    second = epoch_keys(ld)
    assert flat(second) != flat(first)
    assert epoch_keys(loader(two_shards, seed=8)) != first
    assert epoch_keys(loader(two_shards, num_workers=2)) == epoch_keys(loader(two_shards, num_workers=2))
    # One epoch after another: iterating again goes on to the next epoch.
    ld = loader(two_shards)
    assert epoch_keys(ld) == first and epoch_keys(ld) == second


def test_reused_worker_buffers_give_the_batches_of_fresh_ones(two_shards, monkeypatch):
    """Workers fill reused shared-memory buffers (mpp/data/ring.py): every batch handed out must stay
    what it was when later batches reuse its buffer, and equal the batches of fresh buffers."""
    import time

    from mpp.data import loader as loader_module

    held = [(b["key"], b["image"]) for b in loader(two_shards, num_workers=2, batch_size=16)]
    assert len(held) == 2000 // 16  # 62 batches through 2 x 3 buffers: each reused ~20 times
    monkeypatch.setattr(loader_module, "BatchRing", lambda *args: None)
    fresh = [(b["key"], b["image"]) for b in loader(two_shards, num_workers=2, batch_size=16)]
    assert [k for k, _ in held] == [k for k, _ in fresh]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(held, fresh))
    assert len({img.data_ptr() for _, img in held}) == len(held)  # copies, not views of the buffers
    monkeypatch.undo()
    stream = iter(loader(two_shards, num_workers=2, batch_size=16))
    next(stream)
    started = time.perf_counter()
    stream.close()  # workers waiting for a buffer are woken, not left to the DataLoader's 5 s timeout
    assert time.perf_counter() - started < 4


def test_epoch_covers_disjoint_samples_on_simulated_ranks():
    per_rank = [flat(epoch_keys(loader(rank=r, world_size=3, num_workers=2, batch_size=48))) for r in range(3)]
    n = TRAIN_KEYS // (3 * 48)
    assert [len(k) for k in per_rank] == [n * 48] * 3
    all_keys = [k for keys in per_rank for k in keys]
    assert len(set(all_keys)) == len(all_keys)


def test_fewer_shards_than_ranks_times_workers():
    spec = [str(SAMPLE_DATA / "train-000000.tar.gz"), str(SAMPLE_DATA / "train-000001.tar.gz")]
    per_rank = [epoch_keys(loader(spec, num_samples=2000, rank=r, world_size=2, num_workers=3, batch_size=30))
                for r in range(2)]
    assert [len(b) for b in per_rank] == [2000 // 60] * 2
    keys = flat(per_rank[0]) + flat(per_rank[1])
    assert len(keys) == len(set(keys)) == (2000 // 60) * 60


# ---- evaluation: every sample exactly once ----

@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_yields_every_sample_exactly_once_with_a_valid_mask(world):
    batches = {r: list(loader(mode="eval", split="val", rank=r, world_size=world, batch_size=48,
                              num_workers=2 if r == 0 else 0)) for r in range(world)}
    assert len({len(b) for b in batches.values()}) == 1
    valid_keys, labels = [], {}
    for rank_batches in batches.values():
        for b in rank_batches:
            assert b["image"].shape == (48, 3, 16, 16) and len(b["key"]) == 48
            for key, ok, label in zip(b["key"], b["valid"].tolist(), b["label"].tolist()):
                if ok:
                    valid_keys.append(key)
                    labels[key] = label
                else:
                    assert key == "" and label == -1
    assert sorted(valid_keys) == [f"val_{i:08d}" for i in range(1000)]
    truth = {key: int(cls) for key, _, cls in sample_jpegs(1000)}
    assert labels == truth


# ---- resume ----

def keys_and_pixels(batch) -> tuple[list[str], torch.Tensor]:
    return batch["key"], batch["image"].clone()  # workers reuse their batch buffers


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_yields_exactly_the_uninterrupted_keys_and_pixels(workers, two_shards):
    def make():
        return loader(two_shards, num_workers=workers, batch_size=24)

    full = [keys_and_pixels(b) for b in make()] + [keys_and_pixels(b) for b in _at_epoch(make(), 1)]
    n = len(full) // 2
    assert not torch.equal(full[0][1], full[n][1])
    for k in (7, n - 1, n):  # mid-epoch (an odd k: the workers' turn is rotated), last batch, epoch end
        ld = make()
        stream = ld.forever()
        got = [keys_and_pixels(next(stream)) for _ in range(k)]
        state = ld.state_dict()
        assert (state["epoch"], state["batches"]) == ((0, k) if k < n else (1, 0))
        stream.close()
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
        rest = resumed.forever()
        got += [keys_and_pixels(next(rest)) for _ in range(len(full) - k)]
        rest.close()
        assert [keys for keys, _ in got] == [keys for keys, _ in full]
        # The crops and flips too: each sample's are seeded by (seed, epoch, key), not by where the run resumed.
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, full)), k


def test_resumed_finetune_stream_draws_timms_augmentations_again(two_shards):
    """timm's RandAugment and random erasing draw from the global RNGs, seeded per sample as well."""
    def make():
        return loader(two_shards, mode="finetune", batch_size=8)

    stream = make().forever()
    full = [keys_and_pixels(next(stream)) for _ in range(6)]
    stream.close()
    ld = make()
    stream = ld.forever()
    [next(stream) for _ in range(3)]
    state = ld.state_dict()
    stream.close()
    resumed = make()
    resumed.load_state_dict(state)
    rest = resumed.forever()
    got = [keys_and_pixels(next(rest)) for _ in range(3)]
    assert [keys for keys, _ in got] == [keys for keys, _ in full[3:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, full[3:]))


def _at_epoch(ld, epoch):
    ld.set_epoch(epoch)
    return ld


class CountingTransform:
    def __init__(self, transform):
        self.transform, self.calls = transform, 0

    def __getattr__(self, name):
        return getattr(self.transform, name)

    def __call__(self, *args):
        self.calls += 1
        return self.transform(*args)


def test_resume_skips_consumed_samples_without_decoding_them():
    ld = loader(batch_size=50)
    ld.transform = CountingTransform(ld.transform)
    n = len(ld)
    ld.load_state_dict({**ld.state_dict(), "batches": 60})
    assert len(list(ld)) == n - 60
    assert ld.transform.calls == (n - 60) * 50


def test_resume_with_another_layout_warns_and_keeps_the_epoch_fraction():
    ld = loader(batch_size=50)
    stream = iter(ld)
    for _ in range(50):
        next(stream)
    state = ld.state_dict()
    stream.close()
    other = loader(batch_size=25)
    with pytest.warns(UserWarning, match=r"batch_size: 50 -> 25.*batch 100 of 200"):
        other.load_state_dict(state)
    assert (other.epoch, other.batches) == (0, 100)


# ---- bad data ----

@pytest.fixture
def bad_shards(tmp_path):
    """Four shards of 10 planned samples: clean; a corrupt JPEG and an image-less sample; truncated mid-sample;
    a .tar.gz cut in half. Returns (folder, keys that are readable, keys of the .tar.gz that tarfile can read:
    the loader may drop the last of these, whose end it cannot see)."""
    jpegs = sample_jpegs(40)
    samples = [(k, {"jpg": j, "cls": c}) for k, j, c in jpegs]
    write_tar(tmp_path / "s-0.tar", samples[:10])
    corrupt = [(k, dict(f)) for k, f in samples[10:20]]
    corrupt[3][1]["jpg"] = corrupt[3][1]["jpg"][:200] + bytes(random.Random(0).randbytes(300))
    corrupt[6] = (corrupt[6][0], {"cls": b"1"})
    write_tar(tmp_path / "s-1.tar", corrupt)
    starts = write_tar(tmp_path / "s-2.tar", samples[20:30])
    data = (tmp_path / "s-2.tar").read_bytes()
    (tmp_path / "s-2.tar").write_bytes(data[:starts[samples[25][0]] + 512 + 100])  # cut inside sample 25's JPEG
    write_tar(tmp_path / "s-3.tar.gz", samples[30:40], gz=True)
    gz = (tmp_path / "s-3.tar.gz").read_bytes()
    (tmp_path / "s-3.tar.gz").write_bytes(gz[:len(gz) // 2])
    write_manifest(tmp_path, "train", [("s-0.tar", 10), ("s-1.tar", 10), ("s-2.tar", 10), ("s-3.tar.gz", 10)])
    readable_gz = []
    try:
        with tarfile.open(tmp_path / "s-3.tar.gz", "r|gz") as tar:
            for member in tar:
                tar.extractfile(member).read()
                if member.name.endswith(".cls"):
                    readable_gz.append(member.name[:-4])
    except (EOFError, tarfile.TarError, OSError):
        pass
    good = ([k for k, _ in samples[:10]] + [k for i, (k, _) in enumerate(corrupt) if i not in (3, 6)]
            + [k for k, _ in samples[20:25]])
    assert len(readable_gz) >= 2
    return tmp_path, good, readable_gz


def check_good(keys, good, readable_gz):
    """All of `good`, and the .tar.gz's readable samples but perhaps its last; nothing else."""
    got = set(keys)
    from_gz = got - set(good)
    assert set(good) <= got and from_gz <= set(readable_gz)
    assert len(from_gz) >= len(readable_gz) - 1
    return len(got)


def test_corrupt_jpeg_and_truncated_tars_in_evaluation(bad_shards):
    folder, good, readable_gz = bad_shards
    ld = loader(str(folder), mode="eval", batch_size=8, num_workers=2)
    batches = list(ld)
    assert len(batches) == 5
    keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert len(keys) == len(set(keys))  # once each
    yielded = check_good(keys, good, readable_gz)
    assert sum(b["bad"] for b in batches) == 40 - yielded == ld.totals["bad"]


def test_corrupt_jpeg_and_truncated_tars_in_training(bad_shards):
    folder, good, readable_gz = bad_shards
    for workers in (0, 3):
        ld = loader(str(folder), batch_size=8, num_workers=workers, shuffle_buffer=16)
        batches = list(ld)
        assert len(batches) == 5 and all(len(b["key"]) == 8 and b["valid"].all() for b in batches)
        keys = flat(b["key"] for b in batches)
        yielded = check_good(keys, good, readable_gz)  # repeats of good samples fill the bad ones' places
        assert sum(b["bad"] for b in batches) == 40 - yielded
        assert sum(b["repeated"] for b in batches) == 40 - yielded == len(keys) - yielded


def test_shard_holding_fewer_samples_than_planned_keeps_the_batch_count(tmp_path):
    samples = [(k, {"jpg": j, "cls": c}) for k, j, c in sample_jpegs(30)]
    write_tar(tmp_path / "a.tar", samples[:20])
    write_tar(tmp_path / "b.tar", samples[20:])  # 10 samples; no manifest: num_samples=40 plans 20 + 20
    ld = loader(str(tmp_path), num_samples=40, batch_size=4, num_workers=2)
    batches = list(ld)
    assert len(batches) == 10 and sum(b["bad"] for b in batches) == 10 == sum(b["repeated"] for b in batches)
    assert set(flat(b["key"] for b in batches)) == {k for k, _ in samples}


# ---- decoding ----

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_every_image_mode_becomes_rgb():
    grey = Image.new("L", (20, 12), 90)
    cases = {
        "L jpeg": (encode(grey, "JPEG", quality=100), (90, 90, 90)),
        "CMYK jpeg": (encode(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        "RGBA png, transparent": (encode(Image.new("RGBA", (20, 12), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
        "RGBA png, opaque": (encode(Image.new("RGBA", (20, 12), (0, 0, 255, 255)), "PNG"), (0, 0, 255)),
        "LA png, half": (encode(Image.new("LA", (20, 12), (0, 128)), "PNG"), (127, 127, 127)),
        "I;16 png": (encode(Image.fromarray(np.full((12, 20), 257 * 200, np.uint16)), "PNG"), (200, 200, 200)),
        "1 png": (encode(Image.new("1", (20, 12), 1), "PNG"), (255, 255, 255)),
        "webp": (encode(Image.new("RGB", (20, 12), (0, 255, 0)), "WEBP", lossless=True), (0, 255, 0)),
    }
    palette = Image.new("P", (20, 12), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    cases["P png"] = (encode(palette, "PNG"), (10, 200, 30))
    palette_alpha = Image.new("P", (20, 12), 0)
    palette_alpha.putpalette([255, 0, 0, 0, 255, 0])
    cases["P png, transparent index"] = (encode(palette_alpha, "PNG", transparency=0), (255, 255, 255))
    eval_crop = CropTransform(12, "center", flip=False, crop_pct=1.0)
    for name, (data, rgb) in cases.items():
        img = decode_rgb(data)
        assert img.mode == "RGB" and img.size == (20, 12), name
        pixel = img.getpixel((10, 6))
        assert max(abs(a - b) for a, b in zip(pixel, rgb)) <= 3, (name, pixel)
        tensor = eval_crop(data, None)
        assert tensor.shape == (3, 12, 12) and tensor.dtype == torch.uint8, name
        assert (tensor.float().mean((1, 2)) - torch.tensor(rgb, dtype=torch.float)).abs().max() <= 3, name


def smooth_photo(width=960, height=720) -> bytes:
    """A large JPEG with structure at every scale (an upscaled real image plus gradients)."""
    small = decode_rgb(sample_jpegs(1)[0][1]).resize((width, height), Image.BICUBIC)
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(np.asarray(small, dtype=np.float32) * 0.8 + ramp, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=92)


def test_draft_decoding_keeps_the_geometry_and_is_used_when_the_crop_allows():
    data = smooth_photo()
    assert jpeg_size(data) == (960, 720)
    assert draft_factor(400, 300, 64, 64) == 4 and draft_factor(127, 300, 64, 64) == 1
    for kind, size in [("random", 64), ("center", 48), ("random", 300)]:
        drafted = CropTransform(size, kind, scale=(0.3, 1.0))
        full = CropTransform(size, kind, scale=(0.3, 1.0), draft=False)
        diffs = []
        for i in range(12):
            a = drafted(data, random.Random(i))
            b = full(data, random.Random(i))  # same crop box and flip
            assert a.shape == b.shape == (3, size, size)
            diffs.append((a.float() - b.float()).abs().mean().item())
            assert abs(a.float().mean() - b.float().mean()) < 2.0
        assert max(diffs) < 4.0, diffs
        assert full.drafted == 0
        if size < 300:
            assert drafted.drafted == 12  # every crop of these is at least 2x the target
        else:  # only the crops at least 600 px on both sides
            boxes = [random_resized_crop_box(960, 720, (0.3, 1.0), (3 / 4, 4 / 3), random.Random(i)) for i in range(12)]
            allowed = sum(draft_factor(w, h, size, size) > 1 for _, _, h, w in boxes)
            assert drafted.drafted == allowed and 0 < allowed < 12
    small = CropTransform(224, "random")
    small(sample_jpegs(1)[0][1], random.Random(0))  # a 32 px image: nothing to reduce
    assert small.drafted == 0


@pytest.mark.parametrize("region_decoder", [True, False])
def test_random_crop_equals_torchvision_resized_crop(region_decoder, monkeypatch):
    """The pretrain crop is torchvision's RandomResizedCrop + flip on the decoded image, pixel for pixel,
    whether it returns a new tensor or writes into a slot of a channels-last batch, and whether only the
    crop region is decoded or the whole image."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if region_decoder and decode_module._decode_crop is None:
        pytest.skip("mpp's region JPEG decoder was not built (no libjpeg-turbo headers at install)")
    if not region_decoder:
        monkeypatch.setattr(decode_module, "_decode_crop", None)
    data = smooth_photo(400, 300)  # crops at most 300 px high: never decoded reduced at 160
    crop = CropTransform(160, "random", scale=(0.2, 1.0))
    batch = torch.zeros(16, 160, 160, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    pixels = decode_chw(data)
    flips = 0
    for i in range(16):
        ref_rng = random.Random(i)
        top, left, h, w = random_resized_crop_box(400, 300, (0.2, 1.0), (3 / 4, 4 / 3), ref_rng)
        expected = TF.resized_crop(pixels, top, left, h, w, [160, 160], InterpolationMode.BICUBIC, antialias=True)
        if ref_rng.random() < 0.5:
            expected, flips = TF.horizontal_flip(expected), flips + 1
        assert torch.equal(crop(data, random.Random(i)), expected), i
        assert crop(data, random.Random(i), out=batch[i]).data_ptr() == batch[i].data_ptr()
        assert torch.equal(batch[i], expected), i
    assert 0 < flips < 16 and crop.drafted == 0
    assert crop.region_decoded == (32 if region_decoder else 0)


@needs_region_decoder
@pytest.mark.parametrize("kind", ["4:4:4", "4:2:2", "4:2:0", "4:2:0 progressive", "greyscale"])
def test_region_decoding_gives_the_pixels_of_the_full_decode(kind):
    """Only the crop region decoded, mirrored or not, equals torchvision's whole-image decode cropped, at the
    image's edges and inside it, for every chroma subsampling (whose upsampling reads beyond the region)."""
    width, height = 203, 157  # no multiple of the 8 or 16 px block columns and rows
    img = decode_rgb(smooth_photo(width, height))
    options = {"4:4:4": dict(subsampling=0), "4:2:2": dict(subsampling=1), "4:2:0": dict(subsampling=2),
               "4:2:0 progressive": dict(subsampling=2, progressive=True), "greyscale": {}}[kind]
    if kind == "greyscale":
        img = img.convert("L")
    data = encode(img, "JPEG", quality=90, **options)
    full = decode_chw(data).permute(1, 2, 0)  # (H, W, 3)
    rng = random.Random(0)
    boxes = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (0, width - 7, height, 7),
             (16, 15, 17, 33), (height - 20, 0, 20, width), (40, 96, 1, 100)]
    boxes += [random_resized_crop_box(width, height, (0.05, 1.0), (3 / 4, 4 / 3), rng) for _ in range(20)]
    out = np.empty(width * height * 3, np.uint8)
    for top, left, h, w in boxes:
        for flip in (False, True):
            decode_module._decode_crop(data, top, left, h, w, flip, out)
            expected = full[top:top + h, left:left + w]
            got = torch.from_numpy(out[:h * w * 3].reshape(h, w, 3))
            assert torch.equal(got, expected.flip(1) if flip else expected), (top, left, h, w, flip)


def test_a_loader_without_the_region_decoder_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(decode_module, "_decode_crop", None)
    monkeypatch.setattr(decode_module, "_warned_no_region_decoder", False)
    with caplog.at_level("WARNING", logger="mpp.data"):
        loader()
        loader(mode="eval")
    warnings = [r.getMessage() for r in caplog.records if "region JPEG decoder" in r.getMessage()]
    assert len(warnings) == 1 and "libjpeg-turbo" in warnings[0] and "pip install" in warnings[0]


@needs_region_decoder
def test_region_decoder_refuses_what_it_cannot_decode_and_the_transform_falls_back():
    decode_crop, out = decode_module._decode_crop, np.empty(96 * 64 * 3, np.uint8)
    good = smooth_photo(96, 64)
    cmyk = encode(Image.new("CMYK", (96, 64), (0, 255, 255, 0)), "JPEG", quality=100)
    with pytest.raises(RuntimeError, match="libjpeg"):
        decode_crop(cmyk, 0, 0, 8, 8, False, out)
    with pytest.raises(RuntimeError, match="libjpeg"):  # truncated inside the region
        decode_crop(good[:len(good) // 3], 0, 0, 64, 96, False, out)
    with pytest.raises(RuntimeError, match="outside"):
        decode_crop(good, 60, 0, 8, 8, False, out)
    with pytest.raises(ValueError, match="needs"):
        decode_crop(good, 0, 0, 64, 96, False, out[:100])
    crop = CropTransform(48, "random", scale=(0.5, 1.0))  # crops under 2x 48 px: never decoded reduced
    assert torch.equal(crop(cmyk, random.Random(0)), torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
                       .expand(3, 48, 48))  # PIL decoded it
    truncated = good[:-len(good) // 4]  # no end-of-image marker: the whole-image decoders judge it
    with pytest.raises(OSError, match="truncated"):
        crop(truncated, random.Random(0))
    assert crop.region_decoded == 0
    crop(good, random.Random(0))
    assert crop.region_decoded == 1


def test_modes_and_transforms():
    data = smooth_photo(400, 300)
    rng = random.Random(0)
    for mode in ("pretrain", "probe", "eval"):
        out = build_transform(mode, 32)(data, rng)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert build_transform("pretrain", 32).scale == (0.2, 1.0)
    assert build_transform("probe", 32).scale == (0.08, 1.0)
    ft = ShardLoader(SAMPLE_DATA, mode="finetune", batch_size=16, img_size=32, num_workers=0, shuffle_buffer=50)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batch = next(iter(ft))
    assert torch.equal(torch.rand(3), expected)  # timm's augmentations did not draw from the caller's RNG
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (16, 3, 32, 32)
    assert -3 < batch["image"].mean() < 3 and batch["image"].min() < 0
    with pytest.raises(ValueError, match="loader mode"):
        loader(mode="nope")


def test_normalizer_normalises_uint8_and_passes_float_through():
    norm = normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], torch.device("cpu"))
    batch = next(iter(loader(batch_size=4)))["image"]
    out = norm(batch)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out, (batch.float() / 255 - 0.5) / 0.25, atol=1e-6)
    already = torch.randn(2, 3, 4, 4)
    assert torch.equal(norm(already), already)


def test_forever_runs_on_across_epochs_as_the_trainer_draws_it():
    from mpp.config import DataConfig
    cfg = DataConfig(train=str(SAMPLE_DATA), num_workers=0, shuffle_buffer=100)
    loader = ShardLoader.from_config(cfg, mode="pretrain", img_size=32, batch_size=64, seed=3)
    assert len(loader) == 5000 // 64
    keys, stream = [], loader.forever()
    for _ in range(100):  # more than one epoch (78 batches)
        batch = next(stream)
        assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.uint8
        keys.append(batch["key"])
    first_epoch = [k for ks in keys[:78] for k in ks]
    assert len(set(first_epoch)) == 78 * 64  # no sample twice within an epoch
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 22


def test_bench_loader_runs_and_prints_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mpp.bench", "loader", str(SAMPLE_DATA), "--img-size", "16",
                             "--workers", "1", "--batch", "50", "--limit", "300", "--trials", "1", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["decode_only"]["img_per_s"] > 0
    assert report["pipeline"]["1"]["img_per_s"] > 0 and report["naive"]["1"]["img_per_s"] > 0
    parts = report["breakdown_ms_per_img"]
    assert parts["decode"] > 0 and parts["crop_resize"] > 0 and parts["tar_read"] > 0
    assert parts["worker"] == pytest.approx(report["pipeline"]["1"]["worker_cpu_ms_per_img"])
    assert parts["worker"] > parts["decode"] + parts["tar_read"]


# ---- real shards made by data_tools from ../shared/datasets ----

@pytest.mark.skipif(not (SHARED / "imagewoof320" / "val.tar").is_file(),
                    reason=f"needs {SHARED}/imagewoof320 (the shared data sets)")
def test_real_imagewoof_shards_with_greyscale_images(tmp_path):
    out = tmp_path / "woof"
    result = subprocess.run([sys.executable, "-m", "data_tools.shard", str(SHARED / "imagewoof320" / "val.tar"),
                             str(out), "--prefix", "val", "--per-class", "12", "--shard-size", "25"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ld = ShardLoader(str(out), mode="eval", split="val", batch_size=16, img_size=64, num_workers=2)
    batches = list(ld)
    keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert len(keys) == len(set(keys)) == 120 and ld.totals["bad"] == 0
    modes = Counter(Image.open(io.BytesIO(s["jpg"])).mode for u in ld.urls for s in read_slice(u))
    assert modes["RGB"] > 0
    train = ShardLoader(str(out), mode="pretrain", split="val", batch_size=16, img_size=64, num_workers=0,
                        shuffle_buffer=50)
    assert sum(1 for _ in train) == 120 // 16
    assert train.transform.drafted > 0  # 320 px images, 64 px crops: many are decoded at reduced size
