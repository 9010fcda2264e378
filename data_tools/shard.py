"""Turn an image collection into WebDataset shards plus manifest.json.

    python -m data_tools.shard SRC OUT_DIR [--prefix train] [--split val=0.05] [--workers N] ...

SRC is a class-folder tree (label = index of the sorted folder name), a flat folder (no labels),
a .tar of either (read in place; tars inside it read as folders), or a list file of
`path[,label]` lines (.csv, .tsv, .txt). The same source and options always give byte-identical
shards, whatever the worker count; a run that stopped part-way resumes when run again.
"""

import argparse
import json
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from data_tools import manifest as manifests
from data_tools.images import OUTPUT_FORMATS, Encoding, pixel_limit
from data_tools.parallel import available_cpus, run_tasks
from data_tools.plan import keyed, plan_shards, probe_size_ratio, sample_bytes, select, split, tar_bytes
from data_tools.sources import SourceError, open_source
from data_tools.writer import ShardJob, write_shard
from mpp.fileio import write_json

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own decompression-bomb limit, ~89 megapixels
STATE_FILE = "run.json"


class ShardError(Exception):
    """The run cannot go ahead; the message names the culprit and the fix."""


@dataclass(frozen=True)
class ShardOptions:
    """Everything that decides the output. Stored in the manifest: a re-run with other options
    over the same splits is refused unless told to overwrite."""

    prefix: str = "train"  # shard name prefix and name of the split that holds the rest
    split: dict = field(default_factory=dict)  # other splits: {name: fraction of every class}
    per_class: int | None = None
    limit: int | None = None
    seed: int = 0
    shard_size: int = 10000  # samples per shard at most
    shard_bytes: int = 10**9  # bytes per shard at most (see plan.plan_shards)
    format: str = "keep"
    quality: int = 90
    resize_short_side: int | None = None
    reencode: bool = True
    compress: bool = False
    labels: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        for name in (self.prefix, *self.split):
            # Keys are "<split>_<index>": WebDataset cuts a file name at its first dot, "/" is a folder.
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ShardError(f"split name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if self.prefix in self.split:
            raise ShardError(f"--split {self.prefix}=... names the --prefix split, which takes the rest")
        if not all(0 < fraction < 1 for fraction in self.split.values()) or sum(self.split.values()) >= 1:
            raise ShardError(f"--split fractions must be between 0 and 1 and leave some images: {self.split}")
        if self.format not in ("keep", *OUTPUT_FORMATS):
            raise ShardError(f"--format must be keep, {', '.join(OUTPUT_FORMATS)}: {self.format!r}")
        if not self.reencode and (self.format != "keep" or self.resize_short_side is not None):
            raise ShardError("--no-reencode copies images as they are; drop --format/--resize-short-side")
        if not 1 <= self.quality <= 100:
            raise ShardError(f"--quality must be 1..100: {self.quality}")

    @property
    def encoding(self):
        return Encoding(self.format, self.quality, self.resize_short_side, self.reencode)

    @property
    def extension(self):
        return ".tar.gz" if self.compress else ".tar"

    @property
    def split_names(self):
        return [self.prefix, *self.split]


def shard(src, out_dir, options=ShardOptions(), workers=1, overwrite=False, progress=True, log=print):
    """Shard SRC into OUT_DIR; return the manifest. Raises ShardError for a source or output
    folder that cannot be used, before any shard is written."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    source, selected, by_split = read_source(src, options)
    identity = {
        "source": str(src),
        "source_kind": source.kind,
        "fingerprint": source.fingerprint,
        "options": asdict(options),
        "tool": manifests.TOOL_NAME,
    }
    state_dir = out_dir / f".shard-state-{options.prefix}"
    finished = claim_out_dir(out_dir, state_dir, source, identity, options, overwrite)

    job = ShardJob(out_dir, state_dir, source.reader(), options.encoding, options.max_pixels)
    with pixel_limit(options.max_pixels):
        size_ratio = probe_size_ratio(selected, job.reader, options.encoding)
    job.reader.close()
    plans = [
        shard_plan
        for name, samples in by_split.items()
        for shard_plan in plan_shards(name, keyed(name, samples, source.labels), options.shard_size,
                                      options.shard_bytes, size_ratio, options.extension)
    ]
    # A shard is finished when its record says so and the file is there at the recorded size;
    # the rest, and any temporary files of a run that stopped, are (re)written.
    finished = {name: record for name, record in finished.items()
                if (out_dir / name).is_file() and (out_dir / name).stat().st_size == record["bytes"]}
    remove_stale_files(out_dir, options.split_names, keep=finished)
    state_dir.mkdir(exist_ok=True)
    write_json(state_dir / STATE_FILE, identity)

    todo = [shard_plan for shard_plan in plans if shard_plan.name not in finished]
    written = {}
    write_started = time.perf_counter()
    try:
        run_tasks(partial(write_shard, job), todo, workers, sum(len(p.samples) for p in todo),
                  lambda record: written.update({record["name"]: record}),
                  description=f"{options.prefix} -> {out_dir}", progress=progress)
        write_seconds = time.perf_counter() - write_started
        records = {**finished, **written}
        manifest = publish(out_dir, state_dir, plans, records, identity, source.classes, options)
    except KeyboardInterrupt:
        raise ShardError("interrupted; run the same command again to finish the remaining shards") from None
    except OSError as error:
        raise ShardError(write_failure(error, out_dir, state_dir, plans, size_ratio)) from None
    log(summary(manifest, options, out_dir, records, len(finished), written, write_seconds,
                time.perf_counter() - started, workers, source.ignored))
    if all(manifest["splits"][name]["num_samples"] == 0 for name in options.split_names):
        raise ShardError(f"every image was rejected; the reasons are in {out_dir / manifests.REJECTED_NAME}")
    return manifest


def write_failure(error, out_dir, state_dir, plans, size_ratio):
    """The one line for a shard run that could not write (a full disk): what failed, the bytes the unwritten
    shards need and the space there is, and that a re-run keeps the finished shards."""
    done = {path.name.removesuffix(".json") for path in state_dir.glob("*.json") if path.name != STATE_FILE}
    left = [p for p in plans if p.name not in done]
    needed = sum(tar_bytes(sum(sample_bytes(sample, size_ratio) for sample in p.samples)) for p in left)
    free = shutil.disk_usage(out_dir).free
    return (f"writing {error.filename or out_dir} failed: {error.strerror or error}. The {plural(len(left), 'shard')} "
            f"not yet written need up to {needed / 1e6:,.1f} MB ({needed:,} bytes); {out_dir} has "
            f"{free / 1e6:,.1f} MB free. Free some space there, then run the same command again: the "
            f"{plural(len(done), 'finished shard')} are kept")


def read_source(src, options):
    """(source, the selected images shuffled, {split: its images})."""
    try:
        source = open_source(src, labels=options.labels)
        selected = select(source, options.per_class, options.limit, options.seed)
    except (SourceError, ValueError) as error:
        raise ShardError(str(error)) from None
    by_split = split(selected, options.prefix, options.split)
    for name, samples in by_split.items():
        if not samples:
            raise ShardError(f"split {name!r} would get none of the {len(selected)} images; change --split")
    return source, selected, by_split


def claim_out_dir(out_dir, state_dir, source, identity, options, overwrite):
    """Check that this run may write its splits into OUT_DIR; return the records of shards an
    earlier run of the same command finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifests.read_manifest(out_dir)
    check_classes(manifest, source.classes, options.split_names, out_dir)
    finished = previous_records(out_dir, state_dir, manifest, identity, options, overwrite)
    replaced = [name for name in options.split_names
                if name in manifest["splits"] and differences(manifest["splits"][name], identity)]
    if replaced:  # --overwrite: readers must not find the old entries while their shards change
        for name in replaced:
            del manifest["splits"][name]
        manifests.write_manifest(out_dir, manifest)
    return finished


def publish(out_dir, state_dir, plans, records, identity, classes, options):
    """Write manifest.json, rejected.jsonl and the wids indexes for the finished splits; drop
    the run's state. Returns the manifest."""
    # Read again: another run may have added its split to the folder meanwhile.
    manifest = assemble_manifest(manifests.read_manifest(out_dir), plans, records, identity, classes, options)
    rejected = [entry for entry in manifests.read_rejected(out_dir) if entry["split"] not in options.split_names]
    rejected += [entry for shard_plan in plans for entry in records[shard_plan.name]["rejected"]]
    manifests.write_manifest(out_dir, manifest)
    manifests.write_rejected(out_dir, rejected)
    for name in options.split_names:
        manifests.write_wids_index(out_dir, name, manifest["splits"][name]["shards"])
    shutil.rmtree(state_dir)
    return manifest


def check_classes(manifest, classes, split_names, out_dir):
    others = sorted(set(manifest["splits"]) - set(split_names))
    if others and manifest["classes"] != classes:
        raise ShardError(
            f"{out_dir} holds splits {others} with classes {short_list(manifest['classes'])}, but this "
            f"source has {short_list(classes)}; labels would not agree. Use another OUT_DIR"
        )


def short_list(items, shown=5):
    return str(items[:shown])[:-1] + (f", ... {len(items)} in all]" if len(items) > shown else "]")


def previous_records(out_dir, state_dir, manifest, identity, options, overwrite):
    """{shard name: record} of shards an earlier run of the same command finished: from the state
    folder of a run that stopped, or from the manifest of one that completed. An earlier run
    with other options or another source is refused unless `overwrite`."""
    state_file = state_dir / STATE_FILE
    if state_file.is_file():
        earlier = [json.loads(state_file.read_text())]
        records = {path.name.removesuffix(".json"): json.loads(path.read_text())
                   for path in state_dir.glob("*.json") if path.name != STATE_FILE}
    else:
        earlier = [manifest["splits"][name] for name in options.split_names if name in manifest["splits"]]
        rejected = manifests.read_rejected(out_dir)
        records = {
            shard["name"]: {**shard, "rejected": [e for e in rejected if e["shard"] == shard["name"]]}
            for entry in earlier for shard in entry["shards"]
        }
    changes = sorted({change for entry in earlier for change in differences(entry, identity)})
    if not changes:
        return records
    if not overwrite:
        raise ShardError(
            f"{out_dir} holds splits {options.split_names} written {'; '.join(changes)}. Run the "
            "earlier command to resume it, pass --overwrite to replace those splits, or use another OUT_DIR"
        )
    shutil.rmtree(state_dir, ignore_errors=True)
    return {}


def differences(earlier, identity):
    changes = []
    if earlier.get("fingerprint") != identity["fingerprint"]:
        changes.append(f"from other source contents ({earlier.get('source')})")
    old_options = earlier.get("options", {})
    for key, value in identity["options"].items():
        if old_options.get(key) != value:
            changes.append(f"with {key}={old_options.get(key)!r} (now {value!r})")
    if earlier.get("tool") != identity["tool"]:
        changes.append(f"by {earlier.get('tool')} (now {identity['tool']})")
    return changes


def remove_stale_files(out_dir, split_names, keep):
    """Delete this run's splits' shard files that are not finished: temporary files of a run that
    stopped, and shards of an earlier, larger run that was overwritten."""
    pattern = re.compile(rf"({'|'.join(map(re.escape, split_names))})-\d{{6}}\.tar(\.gz)?(\.tmp)?")
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def assemble_manifest(manifest, plans, records, identity, classes, options):
    labels = {}  # key -> label, to take rejected images off the planned class counts
    for shard_plan in plans:
        labels.update((sample.key, sample.label) for sample in shard_plan.samples)
    for name in options.split_names:
        split_plans = [p for p in plans if p.split == name]
        shards = [records[p.name] for p in split_plans]
        counts = Counter(sample.label for p in split_plans for sample in p.samples)
        counts.subtract(labels[entry["key"]] for shard in shards for entry in shard["rejected"])
        manifest["splits"][name] = {
            "num_samples": sum(shard["num_samples"] for shard in shards),
            "num_bytes": sum(shard["bytes"] for shard in shards),
            "num_rejected": sum(len(shard["rejected"]) for shard in shards),
            "class_counts": [counts[label] for label in range(len(classes))],
            **identity,
            "shards": [{key: shard[key] for key in ("name", "num_samples", "bytes", "sha256")}
                       for shard in shards],
        }
    manifest.update(format=manifests.MANIFEST_FORMAT, tool=manifests.TOOL_NAME, classes=classes)
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    return manifest


def summary(manifest, options, out_dir, records, kept, written, write_seconds, seconds, workers, ignored):
    lines = []
    for name in options.split_names:
        entry = manifest["splits"][name]
        lines.append(f"{name}: {entry['num_samples']:,} images in {plural(len(entry['shards']), 'shard')}, "
                     f"{entry['num_bytes'] / 1e6:,.1f} MB")
    if ignored:
        lines.append(f"skipped {plural(ignored, 'file')} in the source: hidden, or not named as an image")
    reasons = Counter(entry["reason"] for record in records.values() for entry in record["rejected"])
    if reasons:
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
        lines.append(f"rejected {sum(reasons.values()):,} files ({detail}), listed in "
                     f"{out_dir / manifests.REJECTED_NAME}")
    if written:
        images = sum(len(r["rejected"]) + r["num_samples"] for r in written.values())
        lines.append(f"wrote {plural(len(written), 'shard')}, {images:,} images in {write_seconds:.1f} s: "
                     f"{images / max(write_seconds, 1e-9):,.0f} img/s with {plural(workers, 'worker')}"
                     + (f"; kept {plural(kept, 'shard')} finished by an earlier run" if kept else ""))
    else:
        lines.append(f"nothing to write: an earlier run finished {'all ' * (kept > 1)}{plural(kept, 'shard')}")
    oversized = [s["name"] for name in options.split_names for s in manifest["splits"][name]["shards"]
                 if s["bytes"] > options.shard_bytes]
    if oversized:  # see plan.plan_shards
        lines.append(f"note: {plural(len(oversized), 'shard')} exceed --shard-bytes {options.shard_bytes:,} "
                     f"(e.g. {oversized[0]}): re-encoded sizes are estimated from a probe of the images, "
                     "and a shard holds at least one image")
    lines.append(f"{seconds:.1f} s in all -> {out_dir}")
    return "\n".join(lines)


def plural(count, word):
    return f"{count:,} {word}{'s' * (count != 1)}"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def byte_size(text):
    """'1G', '500MB', '1.5e9' -> bytes (powers of 1000)."""
    match = re.fullmatch(r"([\d.eE+]+)\s*([kKmMgGtT]?)[bB]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size like 1G or 500M: {text}")
    value = float(match[1]) * 1000 ** " kmgt".index(match[2].lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text}")
    return int(value)


def split_fractions(texts):
    fractions = {}
    for text in texts:
        for part in text.split(","):
            name, _, value = part.partition("=")
            try:
                fractions[name.strip()] = float(value)
            except ValueError:
                raise ShardError(f"--split takes NAME=FRACTION, e.g. val=0.05: {part!r}") from None
    return fractions


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src", help="image folder (class folders or flat), .tar of one, or list file")
    parser.add_argument("out_dir", help="folder for the shards, manifest.json and rejected.jsonl")
    what = parser.add_argument_group("what to shard")
    what.add_argument("--prefix", default="train", help="shard name prefix and split name")
    what.add_argument("--split", action="append", default=[], metavar="NAME=FRACTION",
                      help="put FRACTION of every class into split NAME, in shards of its own (repeatable)")
    what.add_argument("--per-class", type=positive_int, metavar="N", help="keep the first N images of each class, by path")
    what.add_argument("--limit", type=positive_int, metavar="N", help="keep a random N of the images")
    what.add_argument("--seed", type=int, default=0, help="seed of the global shuffle and --limit")
    what.add_argument("--no-labels", action="store_true", help="ignore class folders and list labels")
    what.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                      help="reject larger images as decompression bombs (PIL's limit)")
    shards = parser.add_argument_group("shards")
    shards.add_argument("--shard-size", type=positive_int, default=10000, help="samples per shard at most")
    shards.add_argument("--shard-bytes", type=byte_size, default=10**9,
                        help="bytes per shard at most (estimated when re-encoding)")
    shards.add_argument("--compress", action="store_true",
                        help="gzip the shards (.tar.gz): worth it for small images, whose tar headers outweigh them")
    images = parser.add_argument_group("images")
    images.add_argument("--resize-short-side", type=positive_int, metavar="N",
                        help="shrink images whose short side is over N to N, keeping the aspect ratio")
    images.add_argument("--format", choices=["keep", *OUTPUT_FORMATS], default="keep",
                        help="keep: re-encode only images that change (shrunk or EXIF-rotated) in their own "
                             "format; jpg/webp/png: re-encode every image in that format")
    images.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality of re-encoded images")
    images.add_argument("--no-reencode", action="store_true",
                        help="copy every image's bytes untouched, checking headers only, not pixels (fastest)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=positive_int, default=available_cpus(), metavar="N", help="processes writing shards")
    run.add_argument("--overwrite", action="store_true",
                     help="replace splits in OUT_DIR written from another source or with other options")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        options = ShardOptions(
            prefix=args.prefix, split=split_fractions(args.split), per_class=args.per_class, limit=args.limit,
            seed=args.seed, shard_size=args.shard_size, shard_bytes=args.shard_bytes, format=args.format,
            quality=args.quality, resize_short_side=args.resize_short_side, reencode=not args.no_reencode,
            compress=args.compress, labels=not args.no_labels, max_pixels=args.max_pixels,
        )
        shard(args.src, args.out_dir, options, workers=args.workers, overwrite=args.overwrite,
              progress=not args.quiet and sys.stderr.isatty())
    except ShardError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
