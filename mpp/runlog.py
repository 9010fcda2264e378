"""What a run reports: a progress bar, a JSONL metrics file, and accelerate's trackers (log.trackers: TensorBoard by
default; wandb, mlflow, ... for those who install them)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mpp.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"


def check_tracker_names(names: list[str], prefix: str = "log.") -> None:
    """Refuse a tracker accelerate does not know (it would raise only once the run has started)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from mpp.config import ConfigError
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"{prefix}trackers: unknown tracker {name!r}; choose from "
                              f"{', '.join(LOGGER_TYPE_TO_CLASS)}, or [] for metrics.jsonl only")


def check_trackers_installed(names: list[str], prefix: str = "log.") -> None:
    """Refuse a tracker whose package is missing: accelerate would leave it out without a word."""
    from accelerate.tracking import get_available_trackers
    from mpp.config import ConfigError
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ConfigError(f"{prefix}trackers: {name} is not installed: pip install {name.replace('_', '-')} "
                              f"(or take {name} out of {prefix}trackers)")


def drop_records_after(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` in a JSONL metrics file, atomically. A run resumed at `step` does
    the later steps again (a run killed after its newest checkpoint had logged them): their records would
    otherwise be there twice. A torn last line, from a kill mid-write, goes too."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        atomic_write(path, "".join(kept))


class RunLog:
    def __init__(self, accelerator, output_dir: str | Path, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.file = open(Path(output_dir) / METRICS_FILE, "a") if self.main else None
        interactive = sys.stderr.isatty()  # in a log file, a bar line every 30 s rather than every step
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.main, dynamic_ncols=True,
                        unit="step", smoothing=0.05, mininterval=0.1 if interactive else 30)

    def update(self, **shown) -> None:
        """Advance the bar by one step, showing `shown` beside it."""
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()}, refresh=False)

    def record(self, step: int, metrics: dict) -> None:
        """One metrics record, to the JSONL file and the trackers (log.trackers)."""
        if self.main:
            self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self.file.flush()
        self.accelerator.log(metrics, step=step)

    def print(self, message: str) -> None:
        if self.main:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
