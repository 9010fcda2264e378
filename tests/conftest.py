"""Shared paths and helpers: small, fast pretraining configs on the shipped CIFAR-10 shards."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
BASE = RECIPES / "base.yaml"
QUICKSTART = RECIPES / "quickstart.yaml"
PRETRAIN_SCRIPT = REPO / "mpp" / "pretrain.py"
SAMPLE_DATA = REPO / "mpp" / "sample_data" / "cifar10"


def small_overrides(output_dir, *extra: str) -> list[str]:
    """Quickstart overrides for a fast CPU run; `extra` come last, so they win.

    log.peak_tflops skips the CPU matmul benchmark that only feeds the MFU metric.
    """
    return [
        f"data.train={SAMPLE_DATA}",  # the recipe's path is relative to the repo root; this works from anywhere
        "model.encoder=tiny",
        "train.batch_size=32",
        "train.micro_batch_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=200",
        "log.trackers=[]",
        "log.peak_tflops=1",
        "knn.every=0",  # the quickstart's online kNN; tests that want it set it again
        f"output_dir={output_dir}",
        "resume=null",
        *extra,
    ]


def quick_config(output_dir, *extra: str):
    from mpp.config import PretrainConfig
    from mpp.recipe import load_config
    return load_config(PretrainConfig, QUICKSTART, small_overrides(output_dir, *extra))


def run_train(cfg):
    """mpp.pretrain.train in this process; also checks that it put back the SIGINT/SIGTERM handlers
    it installs for the run (so the test session still answers Ctrl-C), restoring them if not."""
    from mpp.pretrain import train
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(cfg)
    finally:
        left = [sig.name for sig, handler in saved.items() if signal.getsignal(sig) is not handler]
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        assert not left, f"train() left its own handlers for {left} installed"


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written while a test polls a running job
            break
    return records


def checkpoint_steps(output_dir) -> list[int]:
    from mpp.checkpoint import list_checkpoints
    return [int(p.name.split("_")[1]) for p in list_checkpoints(output_dir)]


def subprocess_env(**extra: str) -> dict:
    """The environment of a child process that runs this checkout's mpp (not another installed copy)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def pretrain_command(*args: str) -> list[str]:
    return [sys.executable, str(PRETRAIN_SCRIPT), *map(str, args)]


def start_pretrain(log_path: Path, *args: str) -> subprocess.Popen:
    """`python mpp/pretrain.py ARGS` in the background, stdout and stderr to `log_path`."""
    log = open(log_path, "w")
    try:
        return subprocess.Popen(pretrain_command(*args), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=subprocess_env())
    finally:
        log.close()  # the child holds its own descriptor



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(script_args: list[str], log_dir: Path, env: dict | None = None,
                     timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`accelerate launch SCRIPT_ARGS` as two "nodes" of one CPU process each on this machine (README's multi-node
    command with --num_machines 2, 127.0.0.1 the main node; gloo over loopback): the launchers' results, node 0's
    first, each with its output (stdout and stderr) in log_dir/node<R>.log and in `stdout`."""
    port = str(free_port())
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [open(log_dir / f"node{rank}.log", "w+") for rank in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", *map(str, script_args)],
        cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1", **(env or {})), stdout=log, stderr=subprocess.STDOUT,
        text=True) for rank, log in enumerate(logs)]
    results = []
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, log.read(), ""))
        log.close()
    return results

def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, log_path: Path):
    """Poll `predicate()` until it returns something truthy; fail if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before {what}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def model_config(*overrides: str):
    """recipes/quickstart.yaml's model section (ViT-Tiny/4 at 32 px) with a 1-block decoder of width 64 and
    `key=value` overrides given without the `model.` prefix."""
    from mpp.config import PretrainConfig
    from mpp.recipe import load_config
    small = ["decoder.dim=64", "decoder.depth=1", "decoder.heads=4"]
    return load_config(PretrainConfig, QUICKSTART, [f"model.{o}" for o in (*small, *overrides)]).model


def small_model(*overrides: str):
    """The model of `model_config(*overrides)`."""
    from mpp.models import build_model
    return build_model(model_config(*overrides))


class SmallDisk:
    """tmpfs file systems of a chosen size (a full disk, made on purpose); unmounted when the test ends."""

    def __init__(self, root: Path):
        self.root, self.mounts = root, []

    def make(self, size: int) -> Path:
        """A fresh tmpfs of `size` bytes; skips the test where mounting is not permitted (it needs root)."""
        point = self.root / f"disk{len(self.mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a small tmpfs here to fill up ({result.stderr.strip() or 'mount failed'}); "
                        f"the full-disk cases need root or mount permission")
        self.mounts.append(point)
        return point

    def resize(self, point: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True, capture_output=True)

    def close(self) -> None:
        for point in self.mounts:
            if subprocess.run(["umount", str(point)], capture_output=True).returncode:
                subprocess.run(["umount", "--lazy", str(point)], capture_output=True)  # still busy: detach it


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path)
    yield disk
    disk.close()
