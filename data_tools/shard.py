"""Write a class-folder image tree as WebDataset shards plus a manifest.

    python -m data_tools.shard SRC OUT_DIR [--prefix train] [--shard-size 10000]
                               [--per-class N] [--seed 0] [--compress]

SRC is a directory or a .tar archive (read in place) laid out as
``.../<class name>/<image>``. Images are copied byte for byte; labels are the
index of the class name in the sorted list of classes. The output is
deterministic: the same input and options give byte-identical shards.
"""

import argparse
import collections
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path, PurePosixPath

import webdataset
from PIL import Image, UnidentifiedImageError

from data_tools import __version__

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mpp-shards/1"
TOOL_NAME = f"data_tools.shard {__version__}"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@contextlib.contextmanager
def open_source(src):
    """Yield (file paths relative to SRC, function reading one path's bytes)."""
    if src.is_dir():
        paths = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        yield paths, lambda path: (src / path).read_bytes()
    else:
        with tarfile.open(src) as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            yield list(members), lambda path: archive.extractfile(members[path]).read()


def class_of(path):
    """The name of the image's parent folder; '' for an image with no folder."""
    return PurePosixPath(path).parent.name


def select_samples(paths, per_class, seed):
    """Return (sorted class names, shuffled list of (path, label))."""
    images_by_class = collections.defaultdict(list)
    for path in sorted(paths):
        if PurePosixPath(path).suffix.lower() in IMAGE_EXTENSIONS and class_of(path):
            images_by_class[class_of(path)].append(path)
    classes = sorted(images_by_class)
    samples = [
        (path, label)
        for label, name in enumerate(classes)
        for path in images_by_class[name][:per_class]
    ]
    random.Random(seed).shuffle(samples)
    return classes, samples


def encode_sample(key, path, data, label, class_name):
    extension = PurePosixPath(path).suffix.lower().lstrip(".")
    try:
        width, height = Image.open(io.BytesIO(data)).size  # reads the header only
    except UnidentifiedImageError:
        raise SystemExit(f"error: not a readable image: {path}") from None
    metadata = {"source": path, "width": width, "height": height, "class_name": class_name}
    return {
        "__key__": key,
        "jpg" if extension == "jpeg" else extension: data,
        "cls": str(label).encode(),
        "json": json.dumps(metadata, sort_keys=True).encode(),
    }


def write_shard(path, samples):
    """Write samples to path via a temporary file so a partial shard never appears."""
    temp_path = path.with_name(path.name + ".tmp")
    num_samples = 0
    # Pinning every tar header field (mtime above all) makes shards reproducible.
    header = dict(user="mpp", group="mpp", mode=0o444, mtime=0)
    with open(temp_path, "wb") as raw, (
        # mtime=0 pins the gzip header too; the filename goes in unset since the stream has none.
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if path.suffix == ".gz" else raw
    ) as stream, webdataset.TarWriter(stream, encoder=False, **header) as writer:
        for sample in samples:
            writer.write(sample)
            num_samples += 1
    os.replace(temp_path, path)
    data = path.read_bytes()
    return {
        "name": path.name,
        "num_samples": num_samples,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def load_manifest(out_dir, classes):
    """The existing manifest (or a fresh one) after checking it agrees on the classes."""
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "tool": TOOL_NAME, "classes": classes, "splits": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("classes") != classes:
        raise SystemExit(
            f"error: {path} lists different classes than the source; use another OUT_DIR"
        )
    return manifest


def write_json_atomically(path, content):
    temp_path = path.with_name(path.name + ".tmp")
    temp_path.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temp_path, path)


def shard(src, out_dir, prefix="train", shard_size=10000, per_class=None, seed=0, compress=False):
    """Shard SRC into OUT_DIR as split PREFIX and return that split's manifest entry."""
    src_path, out_dir = Path(src), Path(out_dir)
    if not src_path.exists():
        raise SystemExit(f"error: source does not exist: {src}")
    if not src_path.is_dir() and not tarfile.is_tarfile(src_path):
        raise SystemExit(f"error: source is neither a directory nor a tar archive: {src}")
    with open_source(src_path) as (paths, read):
        classes, samples = select_samples(paths, per_class, seed)
        if not samples:
            raise SystemExit(f"error: no images in class folders under: {src}")
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = load_manifest(out_dir, classes)  # fail before writing any shard
        shards = []
        for start in range(0, len(samples), shard_size):
            encoded = (  # a generator, so only one image is held in memory at a time
                encode_sample(f"{prefix}_{index:08d}", path, read(path), label, classes[label])
                for index, (path, label) in enumerate(samples[start : start + shard_size], start)
            )
            name = f"{prefix}-{len(shards):06d}.tar" + (".gz" if compress else "")
            shards.append(write_shard(out_dir / name, encoded))

    # Drop shards of an earlier run of this split that the new run did not overwrite.
    previous = manifest["splits"].get(prefix, {}).get("shards", [])
    for stale in {s["name"] for s in previous} - {s["name"] for s in shards}:
        (out_dir / stale).unlink(missing_ok=True)

    split = {
        "num_samples": len(samples),
        "source": str(src),
        "options": {"per_class": per_class, "seed": seed, "shard_size": shard_size, "compress": compress},
        "shards": shards,
    }
    manifest["splits"][prefix] = split
    write_json_atomically(out_dir / MANIFEST_NAME, manifest)
    return split


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.shard", description=__doc__.splitlines()[0]
    )
    parser.add_argument("src", help="class-folder tree: a directory or a .tar archive")
    parser.add_argument("out_dir", help="directory for the shards and manifest.json")
    parser.add_argument(
        "--prefix", default="train", help="shard name prefix and split name (default: train)"
    )
    parser.add_argument(
        "--shard-size", type=positive_int, default=10000, help="samples per shard (default: 10000)"
    )
    parser.add_argument(
        "--per-class", type=positive_int, help="keep the first N images of each class, by path"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sample shuffle (default: 0)"
    )
    parser.add_argument(
        "--compress", action="store_true",
        help="gzip the shards (.tar.gz): small images are mostly tar headers and padding, which gzip removes",
    )
    args = parser.parse_args(argv)
    # Keys are "<prefix>_<index>"; WebDataset splits keys at dots and slashes mean folders.
    if not args.prefix or any(char in args.prefix for char in "./"):
        parser.error(f"--prefix must be non-empty without '.' or '/': {args.prefix!r}")

    split = shard(
        args.src, args.out_dir, args.prefix, args.shard_size, args.per_class, args.seed, args.compress
    )
    total_bytes = sum(s["bytes"] for s in split["shards"])
    print(f"{args.prefix}: {split['num_samples']} samples in {len(split['shards'])} shards, "
          f"{total_bytes} bytes -> {args.out_dir}")


if __name__ == "__main__":
    main()
