"""data_tools.shard: sources, labels, splits, bad input, determinism, resume, refusal, resizing.

Small cases use images taken from the shipped CIFAR-10 sample, so they run in a fresh clone;
cases marked `needs_datasets` read the real archives in ../shared/datasets and skip without them.
"""

import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from data_tools import sources
from data_tools.shard import ShardError, ShardOptions, main, shard
from data_tools.tarwriter import ShardTarWriter
from data_tools.verify import verify

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SHARD = REPO / "mpp" / "sample_data" / "cifar10" / "val-000000.tar.gz"
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_datasets = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"no real data sets at {DATASETS}")
quiet = {"progress": False, "log": lambda text: None}


def sample_images():
    """[(class name, image bytes)] of the shipped sample's val shard: 1,000 32x32 JPEGs."""
    with tarfile.open(SAMPLE_SHARD) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    return [(json.loads(files[name])["class_name"], files[name.removesuffix(".json") + ".jpg"])
            for name in sorted(files) if name.endswith(".json")]


def make_tree(root, per_class, classes=("airplane", "cat", "truck")):
    """root/<class>/<class>_<n>.jpg with `per_class` real images of each class."""
    counts = {name: 0 for name in classes}
    for class_name, data in sample_images():
        if counts.get(class_name, per_class) < per_class:
            (root / class_name).mkdir(parents=True, exist_ok=True)
            (root / class_name / f"{class_name}_{counts[class_name]:03d}.jpg").write_bytes(data)
            counts[class_name] += 1
    return root


def read_split(out_dir, split="train"):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    urls = [str(out_dir / s["name"]) for s in manifest["splits"][split]["shards"]]
    return manifest, list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))


def shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.tar*"))}


def extract(archive_path, dest, per_class=None):
    """Extract archive members (the first `per_class` of each folder) to dest; return the names."""
    taken, names = {}, []
    with tarfile.open(archive_path) as archive:
        for member in archive.getmembers():
            folder = os.path.dirname(member.name)
            if member.isfile() and taken.get(folder, 0) < (per_class or 10**9):
                taken[folder] = taken.get(folder, 0) + 1
                names.append(member.name)
                archive.extract(member, dest, filter="data")
    return names


# --- sources and labels ---------------------------------------------------------------------


@needs_datasets
def test_real_tar_and_its_extracted_folder_give_the_same_labelled_shards(tmp_path):
    """imagewoof320 val.tar read in place, and the same files extracted: every sample's label is
    its folder, and both sources give byte-identical shards."""
    archive = DATASETS / "imagewoof320" / "val.tar"
    extract(archive, tmp_path / "folder", per_class=12)
    with tarfile.open(archive) as source:  # the same 12 per class, as a tar read in place
        names = set(extract(archive, tmp_path / "unused", per_class=12))
        with tarfile.open(tmp_path / "subset.tar", "w") as subset:
            for member in source.getmembers():
                if member.name in names:
                    subset.addfile(member, source.extractfile(member))
    options = ShardOptions(shard_size=50)
    shard(tmp_path / "subset.tar", tmp_path / "from_tar", options, workers=1, **quiet)
    shard(tmp_path / "folder", tmp_path / "from_folder", options, workers=2, **quiet)

    assert shard_bytes(tmp_path / "from_tar") == shard_bytes(tmp_path / "from_folder")
    manifest, samples = read_split(tmp_path / "from_tar")
    assert manifest["classes"] == sorted(os.listdir(tmp_path / "folder" / "val"))
    assert len(samples) == 120 and manifest["splits"]["train"]["class_counts"] == [12] * 10
    for sample in samples:
        metadata = json.loads(sample["json"])
        folder = Path(metadata["source"]).parent.name
        assert manifest["classes"][int(sample["cls"])] == folder == metadata["class_name"]
        assert sample["jpg"] == (tmp_path / "folder" / metadata["source"]).read_bytes()


@needs_datasets
def test_real_cifar_tar_with_per_class_and_stratified_split(tmp_path):
    out = tmp_path / "out"
    main([str(DATASETS / "cifar10" / "test.tar"), str(out), "--per-class", "40", "--split", "val=0.1",
          "--shard-size", "100", "--workers", "2"])
    manifest, train = read_split(out, "train")
    _, val = read_split(out, "val")
    assert manifest["splits"]["train"]["class_counts"] == [36] * 10
    assert manifest["splits"]["val"]["class_counts"] == [4] * 10
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [100, 100, 100, 60]
    for split_samples, per_class in ((train, 36), (val, 4)):
        labels = [int(s["cls"]) for s in split_samples]
        assert all(labels.count(label) == per_class for label in range(10))
    sources = [json.loads(s["json"])["source"] for s in train + val]
    assert len(set(sources)) == 400  # disjoint, and the first 40 files of each class folder
    assert {Path(p).name for p in sources} == {f"{i:04d}.jpg" for i in range(40)}
    assert len({s["__key__"] for s in train + val}) == 400


def test_flat_folder_has_no_labels(tmp_path):
    make_tree(tmp_path / "tree", 5)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (tmp_path / "tree").rglob("*.jpg"):
        path.rename(flat / path.name)
    (flat / "notes.txt").write_text("not an image extension: ignored")
    (flat / "._airplane_000.jpg").write_bytes(b"macOS resource fork: hidden, ignored")
    manifest = shard(flat, tmp_path / "out", ShardOptions(), workers=1, **quiet)
    _, samples = read_split(tmp_path / "out")
    assert manifest["classes"] == [] and len(samples) == 15
    assert all("cls" not in s and "class_name" not in json.loads(s["json"]) for s in samples)
    assert manifest["splits"]["train"]["num_rejected"] == 0


def test_extensions_of_any_case_and_nested_folders_under_a_class(tmp_path):
    tree = make_tree(tmp_path / "tree", 3)
    (tree / "cat" / "deeper").mkdir()
    (tree / "cat" / "cat_000.jpg").rename(tree / "cat" / "deeper" / "UPPER.JPEG")
    Image.open(tree / "truck" / "truck_000.jpg").save(tree / "truck" / "as_png.PNG")
    Image.open(tree / "truck" / "truck_001.jpg").save(tree / "truck" / "as_webp.WebP")
    shard(tree, tmp_path / "out", ShardOptions(), workers=1, **quiet)
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["splits"]["train"]["class_counts"] == [3, 3, 5]
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert int(by_source["cat/deeper/UPPER.JPEG"]["cls"]) == 1
    assert "png" in by_source["truck/as_png.PNG"] and "webp" in by_source["truck/as_webp.WebP"]


def test_tar_headers_are_listed_as_tarfile_lists_them(tmp_path):
    """The fast header walk gives tarfile's listing on plain archives (GNU and POSIX headers, folders,
    links, hidden files, class tars inside) and hands pax / long-name archives to tarfile."""
    tree = make_tree(tmp_path / "tree", 3)
    (tree / ".hidden.jpg").write_bytes(b"x")
    (tree / "notes.txt").write_text("not an image")
    (tree / "cat" / "link.jpg").symlink_to("cat_000.jpg")
    inner = tmp_path / "truck.tar"
    with tarfile.open(inner, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(tree / "truck", arcname="truck")
    archives = {}
    for name, fmt in [("gnu", tarfile.GNU_FORMAT), ("ustar", tarfile.USTAR_FORMAT), ("pax", tarfile.PAX_FORMAT)]:
        archives[name] = tmp_path / f"{name}.tar"
        with tarfile.open(archives[name], "w", format=fmt) as archive:
            archive.add(tree, arcname="train")
            archive.add(inner, arcname="train/more/truck.tar")
            if name == "pax":  # a name over ustar's 100 bytes: pax header
                archive.add(tree / "cat" / "cat_001.jpg", arcname="train/cat/" + "x" * 120 + ".jpg")
    for name in ("gnu", "ustar"):
        listing = sources.header_listing(archives[name])
        assert listing == sources.tarfile_listing(archives[name])
        paths = sorted(path for path, *_ in listing[0])
        assert len(paths) == 12 and "train/more/truck/truck/truck_000.jpg" in paths
        assert listing[1] == 3  # the hidden file, the text file and the link
    with pytest.raises(sources.UnusualTar):
        sources.header_listing(archives["pax"])
    assert len(sources.open_source(archives["pax"]).candidates) == 13


def test_tar_of_class_tars_reads_like_class_folders(tmp_path):
    """ImageNet's train archive holds one tar per class; each reads as a class folder."""
    tree = make_tree(tmp_path / "tree", 4)
    outer = tmp_path / "train.tar"
    with tarfile.open(outer, "w") as archive:
        for class_dir in sorted(tree.iterdir()):
            inner = tmp_path / f"{class_dir.name}.tar"
            with tarfile.open(inner, "w") as class_tar:
                for path in sorted(class_dir.iterdir()):
                    class_tar.add(path, arcname=path.name)
            archive.add(inner, arcname=inner.name)
    shard(outer, tmp_path / "from_tar", ShardOptions(), workers=1, **quiet)
    shard(tree, tmp_path / "from_folder", ShardOptions(), workers=1, **quiet)
    assert shard_bytes(tmp_path / "from_tar") == shard_bytes(tmp_path / "from_folder")


def test_list_files_with_names_integers_or_no_labels(tmp_path):
    tree = make_tree(tmp_path / "tree", 3)
    paths = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg"))
    (tree / "named.csv").write_text("path,label\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in paths))
    (tree / "numbered.tsv").write_text("".join(f"{p}\t{7 if p.startswith('cat') else 2}\n" for p in paths))
    (tree / "plain.txt").write_text("# unlabelled\n" + "\n".join(paths) + "\nmissing.jpg\n")

    manifest = shard(tree / "named.csv", tmp_path / "named", ShardOptions(), workers=1, **quiet)
    _, samples = read_split(tmp_path / "named")
    assert manifest["classes"] == ["airplane", "cat", "truck"] and len(samples) == 9
    assert all(manifest["classes"][int(s["cls"])] == json.loads(s["json"])["source"].split("/")[0]
               for s in samples)

    manifest = shard(tree / "numbered.tsv", tmp_path / "numbered", ShardOptions(), workers=1, **quiet)
    _, samples = read_split(tmp_path / "numbered")
    assert manifest["classes"] == [str(i) for i in range(8)]  # integer labels are kept as given
    assert {int(s["cls"]) for s in samples} == {2, 7}

    manifest = shard(tree / "plain.txt", tmp_path / "plain", ShardOptions(), workers=1, **quiet)
    assert manifest["classes"] == [] and manifest["splits"]["train"]["num_samples"] == 9
    rejected = [json.loads(line) for line in (tmp_path / "plain" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejected] == [("missing.jpg", "unreadable")]


def missing_folder(root):
    return root / "no_such_dir"


def empty_folder(root):
    (root / "empty").mkdir()
    return root / "empty"


def tree_with_a_loose_image(root):
    make_tree(root / "tree", 1)
    (root / "tree" / "loose.jpg").write_bytes((root / "tree" / "cat" / "cat_000.jpg").read_bytes())
    return root / "tree"


def gzipped_tar(root):
    with tarfile.open(root / "images.tar.gz", "w:gz") as archive:
        archive.add(make_tree(root / "tree", 1), arcname="tree")
    return root / "images.tar.gz"


def list_of_missing_files(root):
    (root / "list.csv").write_text("gone.jpg,cat\n")
    return root / "list.csv"


@pytest.mark.parametrize("make_source, message", [
    (missing_folder, "does not exist"),
    (empty_folder, "no images"),
    (tree_with_a_loose_image, "mixes images in class folders .* --no-labels"),
    (gzipped_tar, "gunzip"),
    (list_of_missing_files, "none of the files"),
])
def test_unusable_sources_fail_at_once_naming_the_problem(tmp_path, make_source, message):
    src = make_source(tmp_path)
    with pytest.raises(SystemExit, match=message) as error:
        main([str(src), str(tmp_path / "out")])
    assert str(src) in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--no-reencode", "--resize-short-side", "64"], "--no-reencode"),
    (["--split", "val=1.2"], "between 0 and 1"),
    (["--prefix", "a.b"], "split name"),
    (["--split", "train=0.1"], "--prefix"),
])
def test_contradictory_options_are_refused(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main([str(make_tree(tmp_path / "tree", 2)), str(tmp_path / "out"), *args])


# --- bad input ------------------------------------------------------------------------------


def png_claiming(width, height):
    """A small PNG file whose header claims width x height pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def jpeg_claiming(jpeg, width, height):
    """`jpeg` with its frame header changed to claim width x height pixels."""
    sof = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC2))
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


@pytest.mark.parametrize("copy", [False, True], ids=["decoded", "no-reencode"])
def test_bad_files_are_rejected_and_listed_while_the_rest_is_written(tmp_path, copy):
    tree = make_tree(tmp_path / "tree", 6)
    good = (tree / "cat" / "cat_000.jpg").read_bytes()
    (tree / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tree / "cat" / "empty.jpg").write_bytes(b"")
    (tree / "truck" / "text.jpg").write_text("this is not a picture\n")
    (tree / "truck" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (tree / "truck" / "bomb.jpg").write_bytes(jpeg_claiming(good, 60_000, 60_000))
    out = tmp_path / "out"
    logged = []
    manifest = shard(tree, out, ShardOptions(reencode=not copy, shard_size=7), workers=2,
                     progress=False, log=logged.append)

    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["reason"]) for r in rejected) == [
        ("cat/empty.jpg", "empty file"), ("cat/truncated.jpg", "truncated"),
        ("truck/bomb.jpg", "decompression bomb"), ("truck/bomb.png", "decompression bomb"),
        ("truck/text.jpg", "not an image")]
    assert all(r["split"] == "train" and r["shard"].startswith("train-") and r["detail"] for r in rejected)
    split = manifest["splits"]["train"]
    assert split["num_samples"] == 18 and split["num_rejected"] == 5 and split["class_counts"] == [6, 6, 6]
    assert "rejected 5 files" in logged[0] and "rejected.jsonl" in logged[0]
    assert verify(out, workers=1, **quiet) == 0


def test_unreadable_files_are_rejected(tmp_path):
    tree = make_tree(tmp_path / "tree", 2)
    (tree / "cat" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tree / "cat" / "cat_000.jpg").chmod(0)  # unreadable, unless the tests run as root
    shard(tree, tmp_path / "out", ShardOptions(), workers=1, **quiet)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    expected = [("cat/dangling.jpg", "unreadable")] + [("cat/cat_000.jpg", "unreadable")] * (os.geteuid() != 0)
    assert sorted((r["source"], r["reason"]) for r in rejected) == sorted(expected)


def test_a_symlink_loop_named_as_an_image_is_rejected_and_listed(tmp_path):
    tree = make_tree(tmp_path / "tree", 3)
    (tree / "cat" / "loop.jpg").symlink_to("loop.jpg")  # resolving it: "Too many levels of symbolic links"
    (tree / "truck" / "ring").symlink_to("../truck")  # a folder loop: walked once
    manifest = shard(tree, tmp_path / "out", ShardOptions(), workers=1, **quiet)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejected] == [("cat/loop.jpg", "unreadable")]
    assert manifest["splits"]["train"]["num_samples"] == 9  # the folder loop leads back to truck/, read once
    assert verify(tmp_path / "out", workers=1, **quiet) == 0


def test_rejected_jsonl_is_written_empty_when_nothing_is_rejected(tmp_path):
    shard(make_tree(tmp_path / "tree", 2), tmp_path / "out", ShardOptions(), workers=1, **quiet)
    assert (tmp_path / "out" / "rejected.jsonl").read_text() == ""


def test_full_disk_stops_with_a_clear_message_and_a_rerun_keeps_the_finished_shards(tmp_path, small_disk):
    tree = make_tree(tmp_path / "tree", 40, classes=("airplane", "bird", "cat", "ship", "truck"))
    args = ["--shard-size", "20", "--workers", "1"]
    main([str(tree), str(tmp_path / "uninterrupted"), *args])
    needed = sum(p.stat().st_size for p in (tmp_path / "uninterrupted").glob("*.tar"))  # 10 shards
    disk = small_disk.make(needed // 3)
    out = disk / "shards"
    with pytest.raises(SystemExit) as stopped:
        main([str(tree), str(out), *args])
    message = str(stopped.value)
    assert message.startswith("error: writing ") and "\n" not in message
    assert str(out) in message and "No space left on device" in message and "MB free" in message
    assert re.search(r"need up to [\d.]+ MB \(([\d,]+) bytes\)", message)
    finished = {p.name.removesuffix(".json") for p in (out / ".shard-state-train").glob("train-*.json")}
    assert 1 <= len(finished) < 10 and f"the {len(finished)} finished shard" in message
    assert not list(out.glob("*.tmp"))  # the half-written shard is gone, its space free again
    kept = {name: (out / name).stat().st_mtime_ns for name in finished}

    small_disk.resize(disk, 2 * needed)
    main([str(tree), str(out), *args])
    assert shard_bytes(out) == shard_bytes(tmp_path / "uninterrupted")
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == kept  # not written again
    assert verify(out, workers=1, **quiet) == 0


# --- output: determinism, tar bytes, manifest -------------------------------------------------


def test_output_is_identical_for_any_worker_count_and_on_rerun(tmp_path):
    tree = make_tree(tmp_path / "tree", 30)
    options = ShardOptions(shard_size=16, split={"val": 0.2}, seed=3)
    one = shard(tree, tmp_path / "one", options, workers=1, **quiet)
    two = shard(tree, tmp_path / "two", options, workers=2, **quiet)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one["splits"] == two["splits"]
    assert len(one["splits"]["train"]["shards"]) == 5 and one["splits"]["val"]["class_counts"] == [6, 6, 6]

    logged = []
    again = shard(tree, tmp_path / "one", options, workers=2, progress=False, log=logged.append)
    assert again == one and "nothing to write" in logged[0]


def test_shard_tar_writer_writes_the_bytes_of_webdataset_tar_writer():
    samples = [{"__key__": f"train_{i:08d}", "jpg": bytes([i]) * size, "cls": str(i).encode(), "json": b"{}"}
               for i, size in enumerate([0, 1, 511, 512, 513, 10240, 30000])]
    ours, theirs = io.BytesIO(), io.BytesIO()
    with ShardTarWriter(ours, user="mpp", group="mpp", mode=0o444, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    with webdataset.TarWriter(theirs, encoder=False, user="mpp", group="mpp", mode=0o444, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    assert ours.getvalue() == theirs.getvalue()


def test_manifest_records_shards_classes_totals_source_and_options(tmp_path):
    tree = make_tree(tmp_path / "tree", 10)
    out = tmp_path / "out"
    main([str(tree), str(out), "--shard-size", "8", "--split", "val=0.2", "--seed", "5", "--workers", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "mpp-shards/1" and manifest["tool"].startswith("data_tools.shard ")
    assert manifest["classes"] == ["airplane", "cat", "truck"]
    for name, split in manifest["splits"].items():
        assert split["source"] == str(tree) and split["source_kind"] == "folder" and split["fingerprint"]
        assert split["options"]["seed"] == 5 and split["options"]["split"] == {"val": 0.2}
        assert split["num_samples"] == sum(s["num_samples"] for s in split["shards"])
        for entry in split["shards"]:
            data = (out / entry["name"]).read_bytes()
            assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        wids = json.loads((out / f"{name}.wids.json").read_text())
        assert wids["__kind__"] == "wids-shard-index-v1" and wids["name"] == name
        assert wids["shardlist"] == [{"url": s["name"], "nsamples": s["num_samples"], "filesize": s["bytes"]}
                                     for s in split["shards"]]
    assert manifest["totals"] == {"num_samples": 30, "num_rejected": 0, "num_shards": 3 + 1,
                                  "num_bytes": sum(p.stat().st_size for p in out.glob("*.tar"))}
    assert not list(out.glob(".*")) and not list(out.glob("*.tmp"))  # no state or temporary files left

    from mpp.data.shards import resolve_shards  # the consumer reads it
    listed = resolve_shards(str(out), "val")
    assert listed.num_samples == 6 and listed.urls == [str(out / "val-000000.tar")]


def test_shard_byte_limit_holds_when_copying(tmp_path):
    tree = make_tree(tmp_path / "tree", 40)
    manifest = shard(tree, tmp_path / "out", ShardOptions(reencode=False, shard_bytes=60_000), workers=1, **quiet)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["bytes"] <= 60_000 for s in shards)
    assert all(s["num_samples"] > 0 for s in shards)


# --- images: copy, resize, format -------------------------------------------------------------


def test_no_reencode_copies_the_original_bytes(tmp_path):
    tree = make_tree(tmp_path / "tree", 4)
    shard(tree, tmp_path / "out", ShardOptions(reencode=False), workers=1, **quiet)
    _, samples = read_split(tmp_path / "out")
    assert all(s["jpg"] == (tree / json.loads(s["json"])["source"]).read_bytes() for s in samples)


def test_small_images_are_never_enlarged(tmp_path):
    tree = make_tree(tmp_path / "tree", 4)
    shard(tree, tmp_path / "out", ShardOptions(resize_short_side=64), workers=1, **quiet)
    _, samples = read_split(tmp_path / "out")
    assert all(s["jpg"] == (tree / json.loads(s["json"])["source"]).read_bytes() for s in samples)


@needs_datasets
@pytest.mark.parametrize("output_format", ["jpg", "webp"])
def test_resize_shrinks_the_short_side_and_keeps_the_aspect(tmp_path, output_format):
    extract(DATASETS / "imagewoof320" / "val.tar", tmp_path / "woof", per_class=3)
    options = ShardOptions(resize_short_side=100, format=output_format, quality=80)
    shard(tmp_path / "woof", tmp_path / "out", options, workers=2, **quiet)
    manifest, samples = read_split(tmp_path / "out")
    assert len(samples) == 30
    for sample in samples:
        metadata = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample[output_format]))
        image.load()
        assert min(image.size) == 100 and min(metadata["width"], metadata["height"]) == 320
        assert abs(image.width / image.height - metadata["width"] / metadata["height"]) < 0.02
        assert image.mode in ("RGB", "L")


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    tree = make_tree(tmp_path / "tree", 1)
    wide = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    wide.save(tree / "cat" / "rotated.jpg", exif=exif)
    shard(tree, tmp_path / "out", ShardOptions(), workers=1, **quiet)
    _, samples = read_split(tmp_path / "out")
    rotated = next(s for s in samples if json.loads(s["json"])["source"] == "cat/rotated.jpg")
    assert Image.open(io.BytesIO(rotated["jpg"])).size == (20, 40)


# --- resume and refusal ------------------------------------------------------------------------


def test_killed_run_resumes_to_the_shards_of_an_uninterrupted_run(tmp_path):
    tree = make_tree(tmp_path / "tree", 100, classes=("airplane", "bird", "cat", "ship", "truck"))
    args = ["--shard-size", "5", "--format", "webp", "--workers", "1"]
    out = tmp_path / "out"
    state = out / ".shard-state-train"
    process = subprocess.Popen([sys.executable, "-m", "data_tools.shard", str(tree), str(out), *args],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list(state.glob("train-*.json"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stderr = process.stderr.read().decode()
    assert not (out / "manifest.json").exists(), f"the run finished before it was killed: {stderr}"
    finished = {p.name.removesuffix(".json") for p in state.glob("train-*.json")}
    assert 3 <= len(finished) < 100
    kept = {name: (out / name).stat().st_mtime_ns for name in finished}

    main([str(tree), str(out), *args])
    main([str(tree), str(tmp_path / "uninterrupted"), *args])
    assert shard_bytes(out) == shard_bytes(tmp_path / "uninterrupted")
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == kept  # not rewritten
    assert not state.exists() and not list(out.glob("*.tmp"))


def test_rerun_after_a_shard_was_lost_rewrites_only_that_shard(tmp_path):
    tree = make_tree(tmp_path / "tree", 10)
    (tree / "cat" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    options = ShardOptions(shard_size=8)
    first = shard(tree, out, options, workers=1, **quiet)
    expected, rejected = shard_bytes(out), (out / "rejected.jsonl").read_text()
    (out / "train-000001.tar").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert shard(tree, out, options, workers=1, **quiet) == first
    assert shard_bytes(out) == expected and (out / "rejected.jsonl").read_text() == rejected
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept


def test_changed_options_or_source_are_refused_unless_overwrite(tmp_path):
    tree = make_tree(tmp_path / "tree", 10)
    out = tmp_path / "out"
    shard(tree, out, ShardOptions(shard_size=5), workers=1, **quiet)
    with pytest.raises(ShardError, match=r"shard_size=5 \(now 10\)"):
        shard(tree, out, ShardOptions(shard_size=10), workers=1, **quiet)
    (tree / "cat" / "cat_000.jpg").unlink()
    with pytest.raises(ShardError, match="other source contents"):
        shard(tree, out, ShardOptions(shard_size=5), workers=1, **quiet)

    manifest = shard(tree, out, ShardOptions(shard_size=10), workers=1, overwrite=True, **quiet)
    assert manifest["splits"]["train"]["num_samples"] == 29
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]


def test_splits_from_two_sources_share_a_folder(tmp_path):
    """Like the shipped sample: train from one source, val from another, one manifest."""
    train = make_tree(tmp_path / "train", 6)
    val = make_tree(tmp_path / "val", 2)
    out = tmp_path / "out"
    main([str(train), str(out), "--compress", "--workers", "1"])
    main([str(val), str(out), "--prefix", "val", "--compress", "--workers", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert {n: s["num_samples"] for n, s in manifest["splits"].items()} == {"train": 18, "val": 6}
    assert sorted(p.name for p in out.glob("*.tar.gz")) == ["train-000000.tar.gz", "val-000000.tar.gz"]
    assert not list(out.glob("*.wids.json"))  # wids reads uncompressed shards only
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.jpg").write_bytes((val / "cat" / "cat_000.jpg").read_bytes())
    with pytest.raises(SystemExit, match="labels would not agree"):
        main([str(flat), str(out), "--prefix", "test", "--workers", "1"])
