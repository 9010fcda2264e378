"""Files written whole or not at all: a run killed mid-write leaves the previous file (or none), never half of one.

The data goes to a temporary file beside the target (same folder, so the same file system), which
os.replace then renames over the target in one step. The temporary name starts with a dot and
carries the process id, so it is hidden and two processes writing the same target do not collide.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to: renamed to `path` when the block ends, removed
    when it raises. For writers that take a path, e.g. `with atomic_path(p) as tmp: torch.save(obj, tmp)`."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json(path: str | Path, data, indent: int = 2) -> None:
    """`data` as indented JSON, atomically; the folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=indent) + "\n")
