"""Check that a shard folder is sound: every shard, sample and image against manifest.json.

    python -m data_tools.verify OUT_DIR [--split NAME] [--workers N] [--no-decode]

For every shard: present, its byte count and sha256 as listed, its sample count as listed; every
sample has one image that decodes in full, a JSON record, and (when there are classes) a label
within the class list that agrees with the record's class name; keys are unique. Prints a report
and exits 1 on any mismatch.
"""

import argparse
import hashlib
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools.images import IMAGE_FIELDS, pixel_limit
from data_tools.manifest import MANIFEST_NAME, read_manifest, wids_index_path
from data_tools.parallel import available_cpus, run_tasks

MAX_PROBLEMS_PER_SHARD = 20
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ShardCheck:
    split: str
    entry: dict  # the manifest's record of the shard
    classes: list
    max_pixels: int
    decode: bool


def verify_shard(out_dir, check, report=lambda count: None):
    """Problems found in one shard (strings), its sample count, class counts and keys."""
    path = Path(out_dir) / check.entry["name"]
    result = {"name": check.entry["name"], "split": check.split, "problems": [], "num_samples": 0,
              "class_counts": Counter(), "keys": []}
    problems = result["problems"]
    if not path.is_file():
        problems.append("missing")
        return result
    size = path.stat().st_size
    if size != check.entry["bytes"]:
        problems.append(f"{size} bytes, the manifest says {check.entry['bytes']}")
    with open(path, "rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    if sha256 != check.entry["sha256"]:
        problems.append(f"sha256 {sha256[:16]}..., the manifest says {check.entry['sha256'][:16]}...")
    try:
        with open(path, "rb") as stream, pixel_limit(check.max_pixels):
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                result["num_samples"] += 1
                result["keys"].append(sample["__key__"])
                sample_problems, label = check_sample(sample, check)
                problems += [f"{sample['__key__']}: {problem}" for problem in sample_problems]
                result["class_counts"][label] += label is not None
                report(1)
    except Exception as error:  # a damaged tar or gzip stream
        problems.append(f"unreadable after {result['num_samples']} samples: {type(error).__name__}: {error}")
    if result["num_samples"] != check.entry["num_samples"]:
        problems.append(f"{result['num_samples']} samples, the manifest says {check.entry['num_samples']}")
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems[MAX_PROBLEMS_PER_SHARD:] = [f"... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more"]
    result["class_counts"] = dict(result["class_counts"])
    return result


def check_sample(sample, check):
    """(problems, label) of one sample, a dict of field -> bytes; label None when it has none."""
    problems = []
    images = [field for field in IMAGE_FIELDS if field in sample]
    if len(images) != 1:
        problems.append(f"{len(images)} image fields ({', '.join(images) or 'none'}), expected one")
    if images and check.decode:
        try:
            with Image.open(io.BytesIO(sample[images[0]])) as image:
                image.load()
        except Exception as error:
            problems.append(f"image does not decode: {type(error).__name__}: {error}")
    try:
        metadata = json.loads(sample["json"])
    except (KeyError, ValueError) as error:
        problems.append(f"no readable json record ({type(error).__name__})")
        metadata = {}
    if not check.classes:
        if "cls" in sample:
            problems.append("has a label (cls) but the manifest lists no classes")
        return problems, None
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        problems.append("no integer label (cls)")
        return problems, None
    if not 0 <= label < len(check.classes):
        problems.append(f"label {label} is outside the {len(check.classes)} classes")
    elif metadata.get("class_name", check.classes[label]) != check.classes[label]:
        problems.append(f"label {label} is {check.classes[label]!r} but the json says {metadata['class_name']!r}")
    return problems, label


def verify(out_dir, splits=None, workers=1, decode=True, progress=True, log=print):
    """Check OUT_DIR; log a report and return the number of problems found."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        raise SystemExit(f"error: no {MANIFEST_NAME} in {out_dir}; make one with `python -m data_tools.shard`")
    manifest = read_manifest(out_dir)
    classes = manifest.get("classes", [])
    names = splits or list(manifest["splits"])
    unknown = sorted(set(names) - set(manifest["splits"]))
    if unknown:
        raise SystemExit(f"error: {out_dir} has no split {unknown[0]!r}; it has {sorted(manifest['splits'])}")
    checks = []
    for name in names:
        # The limit the shards were written under, so verify rejects no image that shard accepted.
        max_pixels = manifest["splits"][name].get("options", {}).get("max_pixels", DEFAULT_MAX_PIXELS)
        checks += [ShardCheck(name, entry, classes, max_pixels, decode) for entry in manifest["splits"][name]["shards"]]
    results = {}
    run_tasks(partial(verify_shard, out_dir), checks, workers,
              sum(check.entry["num_samples"] for check in checks),
              lambda result: results.update({result["name"]: result}),
              description=f"verify {out_dir}", progress=progress)

    problems = 0
    keys = Counter(key for result in results.values() for key in result["keys"])
    duplicates = [key for key, count in keys.items() if count > 1]
    for name in names:
        split = manifest["splits"][name]
        shard_results = [results[entry["name"]] for entry in split["shards"]]
        split_problems = [f"{r['name']}: {problem}" for r in shard_results for problem in r["problems"]]
        counted = sum(r["num_samples"] for r in shard_results)
        if counted != split["num_samples"]:
            split_problems.append(f"{counted} samples in its shards, the manifest says {split['num_samples']}")
        if classes and "class_counts" in split:
            counts = Counter()
            for r in shard_results:
                counts.update(r["class_counts"])
            found = [counts[label] for label in range(len(classes))]
            if found != split["class_counts"] and not split_problems:
                split_problems.append("images per class differ from the manifest's class_counts")
        split_problems += check_wids_index(out_dir, name, split["shards"])
        problems += len(split_problems)
        status = "OK" if not split_problems else f"{len(split_problems)} problems"
        log(f"{name}: {len(split['shards'])} shard{'s' * (len(split['shards']) != 1)}, {counted:,} samples, "
            f"{sum(e['bytes'] for e in split['shards']) / 1e6:,.1f} MB: {status}")
        for problem in split_problems:
            log(f"  {problem}")
    if duplicates:
        problems += len(duplicates)
        log(f"{len(duplicates)} keys appear more than once, e.g. {duplicates[0]!r}")
    log(f"{'FAILED' if problems else 'OK'}: {len(checks)} shards checked"
        + (", images decoded" if decode else ", images not decoded (--no-decode)")
        + (f"; {problems} problems" if problems else ""))
    return problems


def check_wids_index(out_dir, split, shards):
    path = wids_index_path(out_dir, split)
    if not path.is_file():
        return []
    listed = [(s["url"], s["nsamples"], s["filesize"]) for s in json.loads(path.read_text())["shardlist"]]
    if listed != [(s["name"], s["num_samples"], s["bytes"]) for s in shards]:
        return [f"{path.name} does not list the manifest's shards"]
    return []


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_tools.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a folder written by data_tools.shard")
    parser.add_argument("--split", action="append", help="check only this split (repeatable)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="processes checking shards")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding the images")
    args = parser.parse_args(argv)
    problems = verify(args.out_dir, args.split, max(args.workers, 1), not args.no_decode,
                      progress=sys.stderr.isatty())
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
