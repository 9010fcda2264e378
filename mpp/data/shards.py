"""Shard specs -> shard URLs with per-shard sample counts, and reading samples out of a shard.

A spec is a data_tools output folder or its manifest.json, a wids shard index
(``wids-shard-index-v1`` JSON), a brace pattern (``/data/train-{000000..000127}.tar``), a folder
of ``.tar``/``.tar.gz`` files, a single shard, or a list of any of these. URLs may be local paths,
``http(s)://`` URLs or ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/x.tar -``); remote ones
are opened through webdataset's URL opener (``webdataset.gopen``).

`read_slice(url, skip, take)` yields the raw samples (dicts of bytes, grouped by key as
WebDataset does) number skip .. skip+take-1 of one shard. Skipped samples are not read: a local
uncompressed tar seeks over them, any other stream reads past them without keeping their bytes.
A tar that ends early or cannot be read ends the slice; `SliceStats` counts what it lacked.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from mpp.tar import TarFormatError, TarStream

log = logging.getLogger("mpp.data")

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "hf://", "ais://", "sftp://", "scp://", "ftps://")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WIDS_KIND = "wids-shard-index-v1"


@dataclass
class ShardList:
    urls: list[str]
    num_samples: int | None  # known when the spec has per-shard counts (manifest or wids index)
    counts: list[int] | None = None  # samples per shard, same order as urls

    def __post_init__(self):
        if self.counts is not None and self.num_samples is None:
            self.num_samples = sum(self.counts)


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


_is_remote = is_remote  # the name the first loader used


def _no_match(spec, detail: str = "") -> FileNotFoundError:
    return FileNotFoundError(
        f"shard spec {spec!r} matches no shard files" + (f" ({detail})" if detail else "")
        + ". Make shards with `python -m data_tools.shard SRC OUT_DIR` and point data.train at OUT_DIR."
    )


def _check_opener(url: str) -> None:
    """Fail at once on a URL scheme that webdataset's opener cannot read (s3:// needs a pipe: command)."""
    from webdataset.gopen import gopen_schemes
    scheme = url.split(":", 1)[0]
    if scheme not in gopen_schemes:
        raise FileNotFoundError(f"shard spec {url!r}: no opener for {scheme}:// URLs; read them through a command, "
                                f"e.g. 'pipe:aws s3 cp {url} -', or use http(s):// URLs")


def _read_json(location: str) -> dict:
    if is_remote(location):
        from webdataset import gopen
        with gopen(location, "rb") as stream:
            return json.loads(stream.read())
    return json.loads(Path(location).read_text())


def _join(base: str, name: str) -> str:
    """`name` relative to the folder holding `base` (a path or URL), unless it is absolute or remote."""
    if is_remote(name) or name.startswith("/"):
        return name
    if is_remote(base):
        return base.rsplit("/", 1)[0] + "/" + name
    return str(Path(base).parent / name)


def _from_json(location: str, spec, split: str) -> ShardList:
    try:
        info = _read_json(location)
    except (OSError, ValueError) as err:
        raise _no_match(spec, f"cannot read {location}: {err}") from None
    if isinstance(info, dict) and info.get("__kind__") == WIDS_KIND:
        shards = info.get("shardlist") or []
        return ShardList([_join(location, s["url"]) for s in shards], None, [int(s["nsamples"]) for s in shards])
    if isinstance(info, dict) and "splits" in info:
        if split not in info["splits"]:
            raise FileNotFoundError(f"{location} has no split {split!r} (it has {sorted(info['splits'])}); "
                                    "set data.split")
        entry = info["splits"][split]
        shards = entry["shards"]
        if not shards:
            raise _no_match(spec, f"split {split!r} of {location} lists no shards")
        counts = [int(s["num_samples"]) for s in shards] if all("num_samples" in s for s in shards) else None
        return ShardList([_join(location, s["name"]) for s in shards], entry.get("num_samples"), counts)
    raise _no_match(spec, f"{location} is neither a data_tools manifest nor a {WIDS_KIND} JSON")


def resolve_shards(spec: str | list[str], split: str = "train") -> ShardList:
    """Shard URLs (and, from a manifest or wids index, sample counts) of a spec; fails at once on no match."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise _no_match(spec)
        parts = [resolve_shards(s, split) for s in spec]
        counts = None if any(p.counts is None for p in parts) else [c for p in parts for c in p.counts]
        return ShardList([u for p in parts for u in p.urls], None if counts is None else sum(counts), counts)
    spec = str(spec)
    if is_remote(spec):
        _check_opener(spec)
        if spec.endswith(".json"):
            return _from_json(spec, spec, split)
        return ShardList(list(braceexpand(spec)), None)
    path = Path(spec)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_json(str(path / "manifest.json"), spec, split)
        urls = sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if not urls:
            raise _no_match(spec, "a folder with no manifest.json and no .tar/.tar.gz files")
        return ShardList(urls, None)
    if path.suffix == ".json" and path.is_file():
        return _from_json(spec, spec, split)
    urls = list(braceexpand(spec))
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if not urls or missing:
        raise _no_match(spec, f"missing: {missing[0]}" if missing else "")
    return ShardList(urls, None)


def estimate_counts(num_shards: int, num_samples: int) -> list[int]:
    """Per-shard counts for a spec without them: data_tools' layout, full shards and a shorter last one.

    `num_samples` spread as ceil(N/S) per shard with the remainder in the last shard (exact for shards
    written with a fixed shard size, in name order); evenly when that leaves the last shard empty.
    A shard holding fewer samples than planned is handled by the loader's shortfall rule.
    """
    per = math.ceil(num_samples / num_shards)
    last = num_samples - per * (num_shards - 1)
    if last > 0:
        return [per] * (num_shards - 1) + [last]
    base, extra = divmod(num_samples, num_shards)
    return [base + (i < extra) for i in range(num_shards)]


# ---- reading ----

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split: at the first dot of the name


@dataclass
class SliceStats:
    """What read_slice could not deliver: planned samples missing (each short slice is logged with its cause)."""
    missing: int = 0


class _Prefixed:
    """A read-only stream: `head` (bytes already read from `stream`), then the rest of `stream`."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        if len(data) < n:
            data += self.stream.read(n - len(data))
        return data


READ_ERRORS = (TarFormatError, EOFError, OSError, zlib.error, ValueError)


def open_shard(url: str):
    """(TarStream, underlying stream) over a local path (seekable when uncompressed), http(s) URL or pipe: command."""
    if is_remote(url):
        from webdataset import gopen
        raw = gopen(url, "rb")
        seekable = False
    else:
        raw = open(url, "rb")
        seekable = True
    try:
        if hasattr(raw, "peek"):
            head, stream = raw.peek(2)[:2], raw
        else:
            head = raw.read(2)
            stream = _Prefixed(head, raw)
        if head == b"\x1f\x8b":
            return TarStream(gzip.GzipFile(fileobj=stream, mode="rb"), False), raw
        return TarStream(stream, seekable), raw
    except BaseException:
        raw.close()
        raise


def read_slice(url: str, skip: int = 0, take: int | None = None, stats: SliceStats | None = None):
    """Yield raw samples skip .. skip+take-1 of shard `url`: {"__key__", "__url__", ext: bytes, ...}.

    A sample is the run of consecutive tar members sharing a key. The slice ends early, without
    raising, when the tar ends or fails to read; `stats` then counts the planned samples it lacked.
    """
    stats = stats if stats is not None else SliceStats()
    take = math.inf if take is None else take
    if take <= 0:
        return
    delivered = 0
    try:
        tar, raw = open_shard(url)
    except READ_ERRORS as err:
        _short(url, stats, take, 0, err)
        return
    try:
        index, current, current_key, done = -1, None, None, False  # index: the sample's position in the shard
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                match = _KEY.match(member[0])
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != current_key:
                    if current is not None:
                        delivered += 1
                        yield current
                        current = None
                        if delivered >= take:
                            done = True
                            break
                    current_key, index = key, index + 1
                    if index >= skip:
                        current = {"__key__": key, "__url__": url}
                if current is not None:
                    current[ext] = tar.read()
            if current is not None and not done:  # the end of the tar completes the last sample
                delivered += 1
                yield current
        except READ_ERRORS as err:
            _short(url, stats, take, delivered, err)
            return
        if delivered < take != math.inf:
            _short(url, stats, take, delivered, None)
    finally:
        try:
            raw.close()
        except READ_ERRORS:  # a pipe: whose command failed reports it here
            pass


def _short(url, stats: SliceStats, take, delivered: int, err) -> None:
    if take != math.inf:
        stats.missing += take - delivered
    log.warning("shard %s ended after %d of %s planned samples%s", url, delivered, take,
                f" ({type(err).__name__}: {err})" if err is not None else "")


def count_samples(url: str) -> int:
    """Samples in one shard (a local uncompressed tar: headers only)."""
    tar, raw = open_shard(url)
    count, last = 0, None
    try:
        while True:
            try:
                member = tar.next()
            except READ_ERRORS:
                break
            if member is None:
                break
            match = _KEY.match(member[0])
            if match and match.group(1) != last:
                last, count = match.group(1), count + 1
    finally:
        raw.close()
    return count


def read_first(url: str, count: int) -> list[dict]:
    """The first `count` samples of a shard (for previews)."""
    out = []
    for sample in read_slice(url, 0, None):
        out.append(sample)
        if len(out) >= count:
            break
    return out
