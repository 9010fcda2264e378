"""Which images go to which split and shard: decided in full before any shard is written.

The plan depends only on the source and the options, never on the number of workers or on how
far an earlier run got, so every run of the same command writes the same shards.
"""

import json
import math
import random
from collections import defaultdict
from typing import NamedTuple

from data_tools.images import Rejected, prepare

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a multiple of this
SIZE_PROBE_SAMPLES = 64
SIZE_PROBE_MARGIN = 1.1


class PlannedSample(NamedTuple):
    key: str
    path: str
    location: str | tuple[int, int]
    size: int | None
    label: int | None
    class_name: str | None


class ShardPlan(NamedTuple):
    split: str
    name: str
    samples: list[PlannedSample]


def select(source, per_class=None, limit=None, seed=0):
    """The images to shard, shuffled: the first `per_class` of each class by path, then a random
    `limit` of those. The shuffle is global, so streaming needs only a small shuffle buffer."""
    if per_class is not None and not source.classes:
        raise ValueError("--per-class needs labelled images (class folders or list labels); use --limit")
    by_class = defaultdict(list)
    for candidate in source.candidates:  # sorted by path
        by_class[candidate.class_name].append(candidate)
    # In label order then path order, so the seed alone decides the shuffle.
    ordered = [
        candidate
        for name in sorted(by_class, key=lambda name: source.labels.get(name, -1))
        for candidate in by_class[name][:per_class]
    ]
    random.Random(seed).shuffle(ordered)
    return ordered[:limit]


def split(selected, main_split, fractions):
    """{split name: samples}: each of `fractions` ({name: fraction}) takes that fraction of every
    class (rounded), in shuffled order; `main_split` keeps the rest. Order stays shuffled."""
    quota = defaultdict(dict)  # class -> split -> images still owed
    class_sizes = defaultdict(int)
    for candidate in selected:
        class_sizes[candidate.class_name] += 1
    for name, size in class_sizes.items():
        for split_name, fraction in fractions.items():
            quota[name][split_name] = math.floor(fraction * size + 0.5)
    splits = {main_split: [], **{split_name: [] for split_name in fractions}}
    for candidate in selected:
        owed = quota[candidate.class_name]
        target = next((split_name for split_name in fractions if owed[split_name] > 0), main_split)
        if target != main_split:
            owed[target] -= 1
        splits[target].append(candidate)
    return splits


def keyed(split_name, candidates, labels):
    """Samples with keys `<split>_<position>`: unique across splits, free of dots (WebDataset
    splits a file name at its first dot into key and field)."""
    return [
        PlannedSample(
            f"{split_name}_{index:08d}", c.path, c.location, c.size,
            labels.get(c.class_name), c.class_name,
        )
        for index, c in enumerate(candidates)
    ]


def tar_member_bytes(size):
    return TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK


# The JSON record of a sample less its two strings, for images up to 99999 pixels a side.
JSON_FRAME = len(json.dumps({"class_name": "", "height": 99999, "source": "", "width": 99999}))


def sample_bytes(sample, size_ratio):
    """An upper bound of the tar bytes of one sample whose image is `size` * `size_ratio` bytes."""
    json_size = JSON_FRAME + len(json.dumps(sample.path)) + len(json.dumps(sample.class_name or ""))
    label_bytes = tar_member_bytes(len(str(sample.label))) if sample.label is not None else 0
    return tar_member_bytes(math.ceil((sample.size or 0) * size_ratio)) + tar_member_bytes(json_size) + label_bytes


def tar_bytes(member_bytes):
    """Bytes of a tar holding members of `member_bytes` in all: two zero blocks end it, padding
    fills the last record."""
    return math.ceil((member_bytes + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def plan_shards(split_name, samples, max_samples, max_bytes, size_ratio, extension):
    """Cut `samples` into shards of at most `max_samples` and, by estimate, `max_bytes`.

    Boundaries are fixed here, before anything is written, so that shard i is the same slice for
    any worker count and on every resumed run. The byte estimate is exact (an upper bound of the
    uncompressed tar) when images are copied, since their sizes are known from the source; when
    images are re-encoded their sizes are only known after encoding, so `size_ratio` scales the
    source sizes by the ratio measured on a fixed probe of images (see `probe_size_ratio`).
    """
    shards, current, current_bytes = [], [], 0
    for sample in samples:
        size = sample_bytes(sample, size_ratio)
        if current and (len(current) >= max_samples or tar_bytes(current_bytes + size) > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(current)
    return [
        ShardPlan(split_name, f"{split_name}-{index:06d}{extension}", shard)
        for index, shard in enumerate(shards)
    ]


def probe_size_ratio(selected, reader, encoding):
    """Written bytes over source bytes for the first SIZE_PROBE_SAMPLES of the shuffled images,
    plus a 10% margin: how re-encoding changes sizes, measured the same way on every run."""
    if not encoding.changes_sizes:
        return 1.0
    source_bytes = written_bytes = 0
    for candidate in selected[:SIZE_PROBE_SAMPLES]:
        try:
            data = reader.read(candidate.location)
            written = len(prepare(data, encoding).data)
        except (Rejected, OSError):
            continue
        source_bytes += len(data)
        written_bytes += written
    return SIZE_PROBE_MARGIN * written_bytes / source_bytes if source_bytes else 1.0
