"""The basics of data_tools.shard (its first tests, from the minimal sharder) on a tiny tree of real
CIFAR-10 images; the rest is in test_data_tools_shard.py."""

import hashlib
import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset

from data_tools.shard import main

SAMPLE_SHARD = Path(__file__).parents[1] / "mpp" / "sample_data" / "cifar10" / "val-000000.tar.gz"
CLASSES = ["airplane", "cat", "truck"]
IMAGES_PER_CLASS = 4


@pytest.fixture
def source_tree(tmp_path):
    """A class-folder tree src/<class>/<key>.jpg holding images taken from the shipped sample."""
    src = tmp_path / "src"
    taken = {name: 0 for name in CLASSES}
    with tarfile.open(SAMPLE_SHARD) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    for name in sorted(files):
        if not name.endswith(".json"):
            continue
        key = name.removesuffix(".json")
        class_name = json.loads(files[name])["class_name"]
        if class_name in taken and taken[class_name] < IMAGES_PER_CLASS:
            (src / class_name).mkdir(parents=True, exist_ok=True)
            (src / class_name / f"{key}.jpg").write_bytes(files[f"{key}.jpg"])
            taken[class_name] += 1
    assert all(count == IMAGES_PER_CLASS for count in taken.values())
    return src


def shard(src, out_dir):
    main([str(src), str(out_dir), "--prefix", "val", "--shard-size", "5"])
    return json.loads((out_dir / "manifest.json").read_text())


def test_manifest_describes_the_shards(source_tree, tmp_path):
    out_dir = tmp_path / "out"
    manifest = shard(source_tree, out_dir)

    assert manifest["format"] == "mpp-shards/1"
    assert manifest["classes"] == CLASSES
    split = manifest["splits"]["val"]
    assert split["num_samples"] == len(CLASSES) * IMAGES_PER_CLASS
    expected_names = ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert [s["name"] for s in split["shards"]] == expected_names
    assert [s["num_samples"] for s in split["shards"]] == [5, 5, 2]
    for entry in split["shards"]:
        data = (out_dir / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_samples_carry_their_folder_label_and_original_bytes(source_tree, tmp_path):
    out_dir = tmp_path / "out"
    manifest = shard(source_tree, out_dir)

    shard_paths = [str(out_dir / s["name"]) for s in manifest["splits"]["val"]["shards"]]
    samples = list(webdataset.WebDataset(shard_paths, shardshuffle=False))
    assert len(samples) == manifest["splits"]["val"]["num_samples"]
    assert len({sample["__key__"] for sample in samples}) == len(samples)
    for sample in samples:
        metadata = json.loads(sample["json"])
        folder = Path(metadata["source"]).parent.name
        assert metadata["class_name"] == folder
        assert int(sample["cls"]) == CLASSES.index(folder)
        assert sample["jpg"] == (source_tree / metadata["source"]).read_bytes()
        assert (metadata["width"], metadata["height"]) == (32, 32)


def test_rerun_gives_byte_identical_shards(source_tree, tmp_path):
    out_dir = tmp_path / "out"
    first = shard(source_tree, out_dir)["splits"]["val"]["shards"]
    first_bytes = {entry["name"]: (out_dir / entry["name"]).read_bytes() for entry in first}
    second = shard(source_tree, out_dir)["splits"]["val"]["shards"]

    assert second == first
    assert {name: (out_dir / name).read_bytes() for name in first_bytes} == first_bytes


def test_missing_source_fails_with_its_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(SystemExit, match=re.escape(str(missing))):
        main([str(missing), str(tmp_path / "out")])
