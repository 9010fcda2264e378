"""Show what a shard folder holds: counts per split and class, image sizes, and a contact sheet.

    python -m data_tools.inspect OUT_DIR [--sample N] [--grid sheet.png] [--grid-split train]

Class counts come from manifest.json; image sizes from the first N samples of each split (the
shards are globally shuffled, so these are a random sample). --grid draws one row of images per
class (for up to --rows classes, spread over the class list) with the class name beside it, so
a person can see at a glance that the images and labels agree.
"""

import argparse
import io
import json
import statistics
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools.images import IMAGE_FIELDS
from data_tools.manifest import MANIFEST_NAME, read_manifest

SHORT_SIDE_BUCKETS = (64, 128, 256, 512, 1024)
GRID_SCAN_LIMIT = 200_000  # samples read at most while looking for each row's class
LABEL_WIDTH = 180


def samples(out_dir, split_entry, limit=None):
    """The split's samples in shard order: dicts of field -> bytes."""
    count = 0
    for shard in split_entry["shards"]:
        path = Path(out_dir) / shard["name"]
        with open(path, "rb") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield sample


def image_field(sample):
    return next((field for field in IMAGE_FIELDS if field in sample), None)


def describe_sizes(out_dir, split_entry, limit):
    """Lines describing the stored images of the first `limit` samples."""
    formats, modes, widths, heights, original_short = Counter(), Counter(), [], [], []
    for sample in samples(out_dir, split_entry, limit):
        field = image_field(sample)
        if field is None:
            continue
        with Image.open(io.BytesIO(sample[field])) as image:  # reads the header only
            formats[field] += 1
            modes[image.mode] += 1
            widths.append(image.width)
            heights.append(image.height)
        metadata = json.loads(sample.get("json", b"{}"))
        if "width" in metadata and "height" in metadata:
            original_short.append(min(metadata["width"], metadata["height"]))
    if not widths:
        return ["  no images read"]
    short = [min(w, h) for w, h in zip(widths, heights)]
    lines = [
        f"  {len(widths):,} images read; formats: {dict(formats.most_common())}; modes: {dict(modes.most_common())}",
        spread("width", widths),
        spread("height", heights),
        spread("short side", short),
        spread("aspect w/h", [w / h for w, h in zip(widths, heights)], "{:.2f}"),
    ]
    if original_short and original_short != short:
        lines.append(spread("short side before resizing", original_short))
    lines.append("  short side histogram:")
    bounds = [0, *SHORT_SIDE_BUCKETS, float("inf")]
    histogram = [sum(low <= s < high for s in short) for low, high in zip(bounds, bounds[1:])]
    for low, high, count in zip(bounds, bounds[1:], histogram):
        label = f"{low}-{high - 1}" if high != float("inf") else f">={low}"
        bar = "#" * round(40 * count / max(histogram))
        lines.append(f"    {label:>9} {count:>8,} {bar}")
    return lines


def spread(name, values, number="{:.0f}"):
    ordered = sorted(values)
    at = lambda q: number.format(ordered[min(len(ordered) - 1, int(q * len(ordered)))])
    return (f"  {name:<27} min {number.format(ordered[0])}  p5 {at(0.05)}  median {number.format(statistics.median(ordered))}"
            f"  p95 {at(0.95)}  max {number.format(ordered[-1])}")


def report(out_dir, manifest, split_names, sample_limit):
    classes = manifest.get("classes", [])
    splits = manifest["splits"]
    total = sum(splits[name]["num_samples"] for name in split_names)
    lines = [f"{out_dir}: {len(classes)} classes; "
             + ", ".join(f"{name} {splits[name]['num_samples']:,} in {len(splits[name]['shards'])} shard"
                         + "s" * (len(splits[name]["shards"]) != 1)
                         for name in split_names)
             + f"; {total:,} images, "
             + f"{sum(s['bytes'] for name in split_names for s in splits[name]['shards']) / 1e6:,.1f} MB"]
    for name in split_names:
        if splits[name].get("num_rejected"):
            lines.append(f"{name}: {splits[name]['num_rejected']:,} source files rejected (see rejected.jsonl)")
    if classes:
        width = max(len(name) for name in classes)
        lines.append(f"{'label':>5}  {'class':<{width}}" + "".join(f"{name:>10}" for name in split_names))
        for label, class_name in enumerate(classes):
            counts = [splits[name].get("class_counts", [None] * len(classes))[label] for name in split_names]
            lines.append(f"{label:>5}  {class_name:<{width}}"
                         + "".join(f"{'?' if c is None else f'{c:,}':>10}" for c in counts))
    for name in split_names:
        lines.append(f"{name} images as stored"
                     + (f" (first {sample_limit:,} samples):" if sample_limit else ":"))
        lines += describe_sizes(out_dir, splits[name], sample_limit or None)
    return "\n".join(lines)


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def contact_sheet(out_dir, manifest, split_name, rows, cols, tile):
    """An image of rows x cols samples of the split; with classes, one class per row."""
    classes = manifest.get("classes", [])
    split_entry = manifest["splits"][split_name]
    if classes:  # `rows` labels spread evenly over the class list, `cols` images each
        count = min(rows, len(classes))
        groups = {round(i * (len(classes) - 1) / max(count - 1, 1)): [] for i in range(count)}
        per_group = cols
    else:
        groups, per_group = {None: []}, rows * cols
    for sample in samples(out_dir, split_entry, GRID_SCAN_LIMIT):
        label = int(sample["cls"]) if classes and "cls" in sample else None
        field = image_field(sample)
        if field is None or len(groups.get(label, [None] * per_group)) >= per_group:
            continue
        with Image.open(io.BytesIO(sample[field])) as image:
            groups[label].append(ImageOps.pad(image.convert("RGB"), (tile, tile), color=(128, 128, 128)))
        if all(len(images) >= per_group for images in groups.values()):
            break
    if classes:
        grid_rows = [(f"{label}: {classes[label]}"[:24], images) for label, images in sorted(groups.items())]
    else:
        images = groups[None]
        grid_rows = [("", images[i:i + cols]) for i in range(0, max(len(images), 1), cols)]

    margin, header = 4, 30
    left = LABEL_WIDTH if classes else 0
    sheet = Image.new("RGB", (left + cols * (tile + margin) + margin,
                              header + len(grid_rows) * (tile + margin) + margin), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((margin, 6), f"{Path(out_dir).name} / {split_name}: {split_entry['num_samples']:,} images",
              fill="black", font=font(16))
    for row, (caption, images) in enumerate(grid_rows):
        top = header + row * (tile + margin)
        draw.text((margin, top + tile // 2 - 8), caption, fill="black", font=font(14))
        for col, image in enumerate(images):
            sheet.paste(image, (left + margin + col * (tile + margin), top))
    return sheet


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a folder written by data_tools.shard")
    parser.add_argument("--split", action="append", help="only this split (repeatable)")
    parser.add_argument("--sample", type=int, default=10000,
                        help="read the sizes of this many images per split (0: all)")
    parser.add_argument("--grid", type=Path, help="write a contact sheet to this PNG")
    parser.add_argument("--grid-split", help="split for the contact sheet (default: the first listed)")
    parser.add_argument("--rows", type=int, default=10, help="contact sheet rows (classes)")
    parser.add_argument("--cols", type=int, default=8, help="contact sheet images per row")
    parser.add_argument("--tile", type=int, default=96, help="contact sheet tile size in pixels")
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        raise SystemExit(f"error: no {MANIFEST_NAME} in {out_dir}; make one with `python -m data_tools.shard`")
    manifest = read_manifest(out_dir)
    split_names = args.split or list(manifest["splits"])
    for name in split_names + ([args.grid_split] if args.grid_split else []):
        if name not in manifest["splits"]:
            raise SystemExit(f"error: {out_dir} has no split {name!r}; it has {sorted(manifest['splits'])}")
    print(report(out_dir, manifest, split_names, max(args.sample, 0)))
    if args.grid:
        split_name = args.grid_split or split_names[0]
        contact_sheet(out_dir, manifest, split_name, args.rows, args.cols, args.tile).save(args.grid)
        print(f"contact sheet of {split_name} -> {args.grid}")


if __name__ == "__main__":
    main()
