"""Write one planned shard: read, check and encode its images, skip the bad ones, rename when complete."""

import contextlib
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_tools.images import Encoding, Rejected, pixel_limit, prepare
from data_tools.tarwriter import ShardTarWriter
from mpp.fileio import write_json

# Every tar header field is pinned (mtime above all), so the same samples give the same bytes.
TAR_HEADER = {"user": "mpp", "group": "mpp", "mode": 0o444, "mtime": 0}
GZIP_LEVEL = 9  # shards are written once and read every epoch
WRITE_BUFFER = 1 << 20


@dataclass(frozen=True)
class ShardJob:
    """What every shard of a run shares; sent once to each worker process with its shards."""

    out_dir: Path
    state_dir: Path
    reader: object  # sources.SourceReader
    encoding: Encoding
    max_pixels: int


def temp_path(path):
    return path.with_name(path.name + ".tmp")


class HashingFile:
    """A file being written that hashes its bytes on the way: the shard's sha256 without reading the
    shard back (the read was 0.02 s of the 0.29 s --no-reencode took on imagewoof320; hashing on a
    thread of its own instead made it slower: 0.27 s against 0.16 s, the hand-offs cost more than
    the hashing)."""

    def __init__(self, raw):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


@contextlib.contextmanager
def open_output(path):
    """(stream to write the shard to, the HashingFile under it): the shard's file, gzip-wrapped for .gz
    names. The gzip header's mtime and file name are pinned, as tarfile's own gzip mode writes the
    current time into it."""
    # 1 MiB writes: with the default 8 KiB buffer each ~25 KB sample was its own write() call, and
    # writing imagewoof320's 61 MB took 36 ms instead of 19 (ext4, this project's machine).
    with open(path, "wb", buffering=WRITE_BUFFER) as raw:
        hashing = HashingFile(raw)
        if path.name.endswith(".gz.tmp"):
            with gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, filename="", compresslevel=GZIP_LEVEL) as stream:
                yield stream, hashing
        else:
            yield hashing, hashing


def write_shard(job, plan, report=lambda count: None):
    """Write `plan` (a ShardPlan) to job.out_dir under a temporary name, rename it when complete,
    then record it in job.state_dir; return that record. `report(n)` counts images done."""
    path = job.out_dir / plan.name
    rejected = []
    num_samples = 0
    try:
        with pixel_limit(job.max_pixels), open_output(temp_path(path)) as (stream, hashing), \
                ShardTarWriter(stream, **TAR_HEADER) as writer:
            for sample in plan.samples:
                try:
                    if sample.size is None:
                        raise Rejected("unreadable", "the file does not exist or cannot be read")
                    prepared = prepare(job.reader.read(sample.location), job.encoding)
                except Rejected as error:
                    rejected.append(rejection(plan, sample, error.reason, str(error)))
                except OSError as error:
                    rejected.append(rejection(plan, sample, "unreadable", f"{type(error).__name__}: {error}"))
                else:
                    writer.write(encode_sample(sample, prepared))
                    num_samples += 1
                report(1)
        os.replace(temp_path(path), path)
    except OSError as error:  # writing failed (a full disk): leave no half shard behind, and free its space
        temp_path(path).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None  # names the shard, and pickles whole
    finally:
        job.reader.close()  # a worker receives a fresh copy of the reader with every shard
    record = {
        "name": plan.name,
        "num_samples": num_samples,
        "bytes": path.stat().st_size,
        "sha256": hashing.sha256.hexdigest(),
        "rejected": rejected,
    }
    write_json(job.state_dir / f"{plan.name}.json", record)
    return record


def rejection(plan, sample, reason, detail):
    return {"split": plan.split, "shard": plan.name, "key": sample.key, "source": sample.path,
            "reason": reason, "detail": detail}


def encode_sample(sample, prepared):
    metadata = {"source": sample.path, "width": prepared.width, "height": prepared.height}
    fields = {"__key__": sample.key, prepared.field: prepared.data}
    if sample.label is not None:
        metadata["class_name"] = sample.class_name
        fields["cls"] = str(sample.label).encode()
    fields["json"] = json.dumps(metadata, sort_keys=True).encode()
    return fields
