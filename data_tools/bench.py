"""Measure sharding speed: images/s re-encoding and copying, on 1 and 2 workers, against `tar -cf`.

    python -m data_tools.bench [SRC] [--resize-short-side 256] [--workers 1 2] [--repeat 3] [--json]

SRC (default ../shared/datasets/imagewoof320/train.tar) is sharded in process by
data_tools.shard.shard, best of --repeat runs each: re-encoding at --resize-short-side, and
--no-reencode, on each worker count. The baseline is `tar -cf` over the same files extracted to
a temporary folder. Times exclude starting Python and importing the tools (`import_seconds`,
measured once: webdataset imports torch). Workers take whole shards, so --shard-size is small
enough (default 300) to give every worker several shards of a few thousand images.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from data_tools.shard import ShardOptions, shard

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagewoof320" / "train.tar"


def best_time(function, repeat):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def time_tar(files, out_dir, repeat):
    """Seconds of `tar -cf` writing the files under `files` into one archive."""
    archive = Path(out_dir) / "plain.tar"
    return best_time(lambda: subprocess.run(["tar", "-cf", str(archive), "-C", str(files), "."], check=True), repeat)


def time_shard(src, out_dir, options, workers, repeat):
    """(seconds, images) of sharding src with these options, best of `repeat` fresh runs."""
    manifest = {}

    def run():
        shutil.rmtree(out_dir, ignore_errors=True)
        manifest.update(shard(src, out_dir, options, workers=workers, progress=False, log=lambda text: None))

    seconds = best_time(run, repeat)
    totals = manifest["totals"]
    return seconds, totals["num_samples"] + totals["num_rejected"]


def import_seconds():
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import data_tools.shard"], check=True)
    return time.perf_counter() - started


def bench(src, resize_short_side=256, worker_counts=(1, 2), shard_size=300, repeat=3):
    src = Path(src)
    if not src.exists():
        raise SystemExit(f"error: no benchmark source at {src}; pass one (a .tar or image folder)")
    result = {"source": str(src), "shard_size": shard_size, "repeat": repeat, "runs": []}
    with tempfile.TemporaryDirectory(prefix="data_tools_bench_") as temp:
        temp = Path(temp)
        files = src
        if src.is_file():
            files = temp / "files"
            with tarfile.open(src) as archive:
                archive.extractall(files, filter="data")
        result["tar_seconds"] = time_tar(files, temp, repeat)
        configs = {
            f"re-encode, short side {resize_short_side}":
                ShardOptions(shard_size=shard_size, resize_short_side=resize_short_side),
            "--no-reencode": ShardOptions(shard_size=shard_size, reencode=False),
        }
        for name, options in configs.items():
            for workers in worker_counts:
                seconds, images = time_shard(src, temp / "out", options, workers, repeat)
                result["runs"].append({"config": name, "workers": workers, "seconds": seconds, "images": images,
                                       "images_per_second": images / seconds})
    result["import_seconds"] = import_seconds()
    return result


def targets(result):
    """The issue's targets: copying within 2x of tar's time; 2 workers >= 1.7x one when re-encoding."""
    lines = []
    runs = {(run["config"], run["workers"]): run for run in result["runs"]}
    for (config, workers), run in runs.items():
        if config == "--no-reencode":
            ratio = run["seconds"] / result["tar_seconds"]
            lines.append(f"--no-reencode, {workers} worker(s): {ratio:.2f}x the time of tar -cf "
                         f"(target <= 2): {'met' if ratio <= 2 else 'MISSED'}")
    for config in {run["config"] for run in result["runs"]}:
        if config != "--no-reencode" and (config, 1) in runs and (config, 2) in runs:
            speedup = runs[(config, 2)]["images_per_second"] / runs[(config, 1)]["images_per_second"]
            lines.append(f"{config}: 2 workers {speedup:.2f}x the rate of 1 (target >= 1.7): "
                         f"{'met' if speedup >= 1.7 else 'MISSED'}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", default=str(DEFAULT_SOURCE), help="a .tar or image folder")
    parser.add_argument("--resize-short-side", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    parser.add_argument("--shard-size", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    result = bench(args.src, args.resize_short_side, args.workers, args.shard_size, args.repeat)
    result["targets"] = targets(result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"source: {result['source']} (best of {args.repeat}; shard size {args.shard_size})")
    print(f"{'configuration':<28} {'workers':>7} {'images':>7} {'seconds':>8} {'img/s':>8}")
    for run in result["runs"]:
        print(f"{run['config']:<28} {run['workers']:>7} {run['images']:>7} {run['seconds']:>8.2f} "
              f"{run['images_per_second']:>8.0f}")
    print(f"{'tar -cf of the same files':<28} {'':>7} {'':>7} {result['tar_seconds']:>8.2f}")
    print(f"(starting Python and importing data_tools.shard, not in the times above: {result['import_seconds']:.1f} s)")
    for line in result["targets"]:
        print(line)


if __name__ == "__main__":
    main()
