"""Turn a shard spec into a list of shard URLs (and, from a data_tools manifest, a sample count)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand


@dataclass
class ShardList:
    urls: list[str]
    num_samples: int | None  # known when the spec is a data_tools manifest


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:", "s3://", "gs://"))


def resolve_shards(spec: str | list[str], split: str = "train") -> ShardList:
    """A spec is a data_tools output folder, its manifest.json, a brace pattern, or a list of these."""
    if isinstance(spec, (list, tuple)):
        parts = [resolve_shards(s, split) for s in spec]
        counts = [p.num_samples for p in parts]
        return ShardList([u for p in parts for u in p.urls], None if None in counts else sum(counts))
    path = Path(spec)
    manifest = path / "manifest.json" if path.is_dir() else path
    if manifest.name == "manifest.json" and manifest.is_file():
        info = json.loads(manifest.read_text())
        if split not in info["splits"]:
            raise FileNotFoundError(f"{manifest} has no split {split!r} (it has {sorted(info['splits'])}); set data.split")
        entry = info["splits"][split]
        return ShardList([str(manifest.parent / s["name"]) for s in entry["shards"]], entry["num_samples"])
    if path.is_dir():
        urls = sorted(str(p) for p in [*path.glob("*.tar"), *path.glob("*.tar.gz")])
    else:
        urls = list(braceexpand(spec))
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if not urls or missing:
        raise FileNotFoundError(
            f"shard spec {spec!r} matches no shard files" + (f" (missing: {missing[0]})" if missing else "")
            + ". Make shards with `python -m data_tools.shard SRC OUT_DIR` and point data.train at OUT_DIR."
        )
    return ShardList(urls, None)
