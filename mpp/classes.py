"""The class count of labelled shards: the data_tools manifest's class list, or the labels themselves."""
from __future__ import annotations

from pathlib import Path

import torch


def manifest_classes(spec) -> list[str] | None:
    """The class names a data_tools manifest lists for `spec`, if it has one."""
    from mpp.data.shards import _read_json, is_remote
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    for item in specs:
        item = str(item)
        if item.endswith(".json"):
            location = item
        elif not is_remote(item) and (Path(item) / "manifest.json").is_file():
            location = str(Path(item) / "manifest.json")
        else:
            continue
        try:
            classes = _read_json(location).get("classes")
        except (OSError, ValueError, AttributeError):
            continue
        if classes:
            return list(classes)
    return None


def class_count(spec, *label_sets: torch.Tensor) -> tuple[int, list[str]]:
    """(number of classes, notes): the manifest's class list, or the largest label + 1 when it has none."""
    labels = torch.cat([y.flatten() for y in label_sets])
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} samples of {spec!r} have no label (.cls): a probe and kNN need "
                         f"labelled shards (python -m data_tools.shard with class folders or a labelled source)")
    top = int(labels.max()) + 1 if len(labels) else 0
    classes = manifest_classes(spec)
    if classes is not None:
        if top > len(classes):
            raise ValueError(f"label {top - 1} of {spec!r} is past the manifest's {len(classes)} classes")
        return len(classes), []
    return top, [f"no class list in the shards' manifest: num_classes = largest label + 1 = {top}"]
