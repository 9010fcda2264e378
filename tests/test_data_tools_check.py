"""data_tools.verify, data_tools.inspect and data_tools.bench on small shard folders made from the
shipped CIFAR-10 sample (so they run in a fresh clone)."""

import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools import bench as bench_module
from data_tools.inspect import main as inspect_main
from data_tools.shard import ShardOptions, shard
from data_tools.verify import main as verify_main

SAMPLE = Path(__file__).resolve().parents[1] / "mpp" / "sample_data" / "cifar10"


def make_tree(root, per_class):
    """root/<class>/<n>.jpg: `per_class` images of each CIFAR-10 class from the shipped val shard."""
    counts = {}
    with tarfile.open(SAMPLE / "val-000000.tar.gz") as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    for name in sorted(files):
        if name.endswith(".json"):
            class_name = json.loads(files[name])["class_name"]
            if counts.get(class_name, 0) < per_class:
                counts[class_name] = counts.get(class_name, 0) + 1
                (root / class_name).mkdir(parents=True, exist_ok=True)
                (root / class_name / f"{counts[class_name]:03d}.jpg").write_bytes(files[name[:-5] + ".jpg"])
    return root


@pytest.fixture
def shards(tmp_path):
    out = tmp_path / "out"
    shard(make_tree(tmp_path / "tree", 8), out, ShardOptions(shard_size=20, split={"val": 0.25}),
          workers=1, progress=False, log=lambda text: None)
    return out


def run_verify(out, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify_main([str(out), "--workers", "1"])
    return exit_info.value.code, capsys.readouterr().out


def test_verify_passes_sound_shards_and_the_shipped_sample(shards, capsys):
    code, report = run_verify(shards, capsys)
    assert code == 0 and "train: 3 shards, 60 samples" in report and report.rstrip().endswith("images decoded")
    code, report = run_verify(SAMPLE, capsys)
    assert code == 0, report


def test_verify_catches_a_flipped_byte(shards, capsys):
    path = shards / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    code, report = run_verify(shards, capsys)
    assert code == 1 and "train-000001.tar: sha256" in report and "FAILED" in report


def test_verify_catches_missing_shards_wrong_counts_and_labels_outside_the_classes(shards, capsys):
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "val-000000.tar").unlink()
    manifest["splits"]["train"]["shards"][0]["num_samples"] += 1
    manifest["classes"] = manifest["classes"][:5]  # labels 5..9 now lie outside the class list
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, report = run_verify(shards, capsys)
    assert code == 1
    assert "val-000000.tar: missing" in report
    assert "train-000000.tar: 20 samples, the manifest says 21" in report
    assert "is outside the 5 classes" in report


def test_inspect_reports_counts_and_sizes_and_draws_a_contact_sheet(shards, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    inspect_main([str(shards), "--grid", str(sheet), "--rows", "4", "--cols", "3", "--tile", "40"])
    report = capsys.readouterr().out
    assert "10 classes; train 60 in 3 shards, val 20 in 1 shard" in report
    assert re.search(r"^\s+3\s+cat\s+6\s+2$", report, re.MULTILINE)  # label, class, train, val
    assert "short side                  min 32" in report
    image = Image.open(sheet)
    assert image.size == (180 + 3 * 44 + 4, 30 + 4 * 44 + 4)
    # Each row holds images of one class: the contact sheet is not blank where images go.
    assert image.getpixel((180 + 4 + 20, 30 + 20)) != (255, 255, 255)


def test_bench_measures_every_configuration(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree", 6)
    monkeypatch.setattr(bench_module, "import_seconds", lambda: 0.0)
    result = bench_module.bench(tree, resize_short_side=16, worker_counts=(1, 2), shard_size=20, repeat=1)
    assert result["tar_seconds"] > 0
    assert [(run["config"], run["workers"], run["images"]) for run in result["runs"]] == [
        ("re-encode, short side 16", 1, 60), ("re-encode, short side 16", 2, 60),
        ("--no-reencode", 1, 60), ("--no-reencode", 2, 60)]
    assert len(bench_module.targets(result)) == 3
