"""Checkpoints: accelerate's save_state (model, optimizer, scaler, RNG and registered objects),
written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint where `resume=auto` would find it. The newest `keep` are kept."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = [p for p in root.glob("step_*") if _NAME.match(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`auto`: the newest checkpoint in output_dir, or None for a fresh start; else the given path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume!r}: no checkpoint folder there; use resume=auto or a path under "
                                f"{Path(output_dir) / CHECKPOINT_DIR}")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int, config: dict | None = None) -> Path:
    """Collective: every process must call it (each saves its RNG state, FSDP shards its weights).
    `config`, if given, is stored as config.yaml inside the checkpoint."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:  # leftovers of saves that were killed mid-write
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if config is not None and accelerator.is_main_process:
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        raise OSError(f"writing checkpoint {final} failed ({err}); is the disk full? The last complete "
                      f"checkpoint is {previous[-1] if previous else 'none'}, untouched.") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
