"""The files that describe an output folder: manifest.json, rejected.jsonl and wids shard indexes.

manifest.json (read by mpp.data.shards):
    format, tool, classes, totals {num_samples, num_bytes, num_shards, num_rejected},
    splits: {name: {num_samples, num_bytes, num_rejected, class_counts, source, source_kind,
                    fingerprint, options, tool, shards: [{name, num_samples, bytes, sha256}]}}
Shard names are relative to the manifest's folder. Splits written by different runs (a train and
a val source) share the folder and the class list.
"""

import json
from pathlib import Path

from data_tools import __version__
from mpp.fileio import atomic_write, write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mpp-shards/1"
REJECTED_NAME = "rejected.jsonl"
TOOL_NAME = f"data_tools.shard {__version__}"


def read_manifest(out_dir):
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "tool": TOOL_NAME, "classes": [], "splits": {}}
    return json.loads(path.read_text())


def write_manifest(out_dir, manifest):
    splits = manifest["splits"].values()
    manifest["totals"] = {
        "num_samples": sum(split["num_samples"] for split in splits),
        "num_bytes": sum(shard["bytes"] for split in splits for shard in split["shards"]),
        "num_shards": sum(len(split["shards"]) for split in splits),
        "num_rejected": sum(split.get("num_rejected", 0) for split in splits),
    }
    write_json(Path(out_dir) / MANIFEST_NAME, manifest)


def read_rejected(out_dir):
    path = Path(out_dir) / REJECTED_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rejected(out_dir, entries):
    """One JSON object a line: split, shard, key, source, reason, detail. Empty when nothing was rejected
    (always written, so that its absence never has to be read as "nothing rejected")."""
    path = Path(out_dir) / REJECTED_NAME
    atomic_write(path, "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries))


def wids_index_path(out_dir, split):
    return Path(out_dir) / f"{split}.wids.json"


def write_wids_index(out_dir, split, shards):
    """The split's shards in wids' `wids-shard-index-v1` format, for random-access readers
    (wids.ShardListDataset("OUT/train.wids.json")). wids resolves the shard names against the
    index file's folder, and reads uncompressed shards only, so .tar.gz shards get no index."""
    path = wids_index_path(out_dir, split)
    if any(shard["name"].endswith(".gz") for shard in shards):
        path.unlink(missing_ok=True)
        return
    write_json(path, {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": split,
        "shardlist": [
            {"url": shard["name"], "nsamples": shard["num_samples"], "filesize": shard["bytes"]}
            for shard in shards
        ],
    })
