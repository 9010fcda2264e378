"""Checkpoints: accelerate's save_state (the model as safetensors, the optimizer, the grad scaler, each
process's RNG states) and beside it mpp's own state as plain data: `state.json` (the run's position, the
loader's), `<name>.safetensors` for extra weights (an EMA) and `config.yaml`. All are written to a temporary
folder renamed into place, so a crash mid-write never leaves a half checkpoint where `resume=auto` would
find it. The newest `keep` are kept.

Reading a checkpoint back runs no code from it: JSON, YAML (safe_load), safetensors, and
torch.load(weights_only=True) for the optimizer and RNG states. `read_checkpoint` reads every file before
anything is loaded, so a damaged, foreign or planted file stops a resume with one line naming it;
accelerate's own `custom_checkpoint_*.pkl` files, which it unpickles in full, are refused unread.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
STATE_FORMAT = 1
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
RNG_FILE = "random_states_{}.pkl"  # accelerate's name
_NAME = re.compile(r"^step_(\d{8})$")
_PICKLED_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # what accelerate loads with weights_only=False


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


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


# ---- saving ----

def tensor_bytes(*state_dicts: dict) -> int:
    """Bytes of the tensors in (nested) state dicts: what a checkpoint of them takes on disk, near enough."""
    def walk(value):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0
    return sum(walk(s) for s in state_dicts)


def _space_note(root: Path, needed: int | None) -> str:
    free = shutil.disk_usage(root).free if root.exists() else None
    parts = []
    if needed:
        parts.append(f"a checkpoint needs about {needed / 1e6:,.1f} MB ({needed:,} bytes)")
    if free is not None:
        parts.append(f"{root} has {free / 1e6:,.1f} MB free")
    return "; ".join(parts)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int, *, config: dict, state: dict,
                    modules: dict | None = None, needed_bytes: int | None = None) -> Path:
    """Collective: every process must call it (each saves its RNG state, FSDP shards its weights).
    `state`: plain data (JSON) of the main process, e.g. {"run": ..., "loader": ...}; `modules`: extra weights
    saved as <name>.safetensors; `config` is stored as config.yaml. `needed_bytes`, the checkpoint's size near
    enough, is checked against the free space first: a run on a full disk stops before writing, naming both."""
    from safetensors.torch import save_model
    root = Path(output_dir) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    previous = list_checkpoints(output_dir)
    kept = f"the last complete checkpoint, {previous[-1]}, is untouched" if previous else "no checkpoint was saved"
    if previous:  # the next checkpoint is the size of the last one, the best estimate when a write fails
        last_size = sum(p.stat().st_size for p in previous[-1].iterdir() if p.is_file())
    if accelerator.is_main_process:  # leftovers of saves that were killed mid-write
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    short = accelerator.is_main_process and needed_bytes is not None and shutil.disk_usage(root).free < needed_bytes
    # Every process must leave together: the decision is the main process's, shared in one collective.
    if accelerator.reduce(torch.tensor(float(short), device=accelerator.device), "sum").item() > 0:
        raise OSError(f"not enough space for checkpoint {final}: {_space_note(root, needed_bytes)}. Free some "
                      f"space there (or lower checkpoint.keep), then continue with resume=auto; {kept}"
                      if accelerator.is_main_process else f"the main process found no space for checkpoint {final}")
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
            (tmp / STATE_FILE).write_text(json.dumps({"format": STATE_FORMAT, **state}, indent=1) + "\n")
            for name, module in (modules or {}).items():
                save_model(module, str(tmp / f"{name}.safetensors"))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        needed = max(needed_bytes or 0, last_size if previous else 0) or None
        raise OSError(f"writing checkpoint {final} failed ({first_line(err)}); is the disk full? "
                      f"{_space_note(root, needed)}. Free some space there (or lower checkpoint.keep), then "
                      f"continue with resume=auto; {kept}") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---- reading back ----

@dataclasses.dataclass
class SavedCheckpoint:
    """What `read_checkpoint` found, checked, before anything is loaded into the run."""
    path: Path
    config: dict
    state: dict                 # state.json less its format
    rng: dict | None            # this process's RNG states; None: the checkpoint has none for it
    optimizer_groups: list[int] | None  # parameters per optimizer param group
    rng_note: str | None = None


def first_line(err: BaseException) -> str:
    """`Type: first sentence` of an error: torch's and safetensors' run to paragraphs (with terminal colours)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 100 and ". " in text:
        text = text[:text.index(". ")]
    return f"{type(err).__name__}: {text}".rstrip(": ")


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot resume from {path.parent}: {path.name} {problem}. Resume from an earlier "
                           f"checkpoint (resume=PATH) or start afresh in another output_dir")


def _torch_load(path: Path, **kwargs):
    """torch.load with weights_only=True, plus the numpy types accelerate's RNG states hold (accelerate's own
    loader): refuses anything that would run code."""
    from accelerate.utils import load
    try:
        return load(str(path), map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever the damage, one line naming the file
        raise _damaged(path, f"cannot be read as weights-only torch data ({first_line(err)}): it is damaged, or "
                             f"holds pickled objects, which mpp never loads") from None


def read_checkpoint(checkpoint: Path, process_index: int, *, model_file: bool = True) -> SavedCheckpoint:
    """Read and check every file of `checkpoint` that a resume loads, running no code from any of them.
    model_file=False: the weights are not model.safetensors (FSDP saves its own layout)."""
    checkpoint = Path(checkpoint)
    pickled = sorted(p.name for p in checkpoint.iterdir() if _PICKLED_STATE.match(p.name))
    if pickled:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it holds {', '.join(pickled)}, pickled state (an mpp from before "
            f"state.json, or a planted file) that accelerate would unpickle, which can run any code. mpp does not "
            f"load it: resume from a checkpoint written by this version, or start afresh in another output_dir")
    config_path = checkpoint / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"cannot resume from {checkpoint}: it has no {CONFIG_FILE}, so it is not a complete "
                              f"mpp checkpoint (mpp writes one into each). Resume from another checkpoint "
                              f"(resume=PATH) or start afresh in another output_dir")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise _damaged(config_path, f"is not valid YAML ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise _damaged(config_path, "is not a mapping of config keys")

    state_path = checkpoint / STATE_FILE
    if not state_path.is_file():
        raise _damaged(state_path, "is missing (the run's and the loader's position)")
    try:
        state = json.loads(state_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged(state_path, f"is not valid JSON ({first_line(err)})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise _damaged(state_path, f"is not mpp run state of format {STATE_FORMAT}")
    state.pop("format")

    if model_file:
        check_safetensors(checkpoint / MODEL_FILE)
    optimizer_groups = None
    optimizer_path = checkpoint / OPTIMIZER_FILE
    if optimizer_path.is_file():
        # mmap: the pickled structure is read and checked, the tensors' bytes only mapped.
        saved = _torch_load(optimizer_path, mmap=True)
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
            raise _damaged(optimizer_path, "is not an optimizer state")
        optimizer_groups = [len(group.get("params", ())) for group in saved["param_groups"]]
    elif model_file:
        raise _damaged(optimizer_path, "is missing")

    rng, rng_note = None, None
    rng_path = checkpoint / RNG_FILE.format(process_index)
    if rng_path.is_file():
        rng = _torch_load(rng_path)
        needed = ("random_state", "numpy_random_seed", "torch_manual_seed")
        if not isinstance(rng, dict) or not all(k in rng for k in needed):
            raise _damaged(rng_path, "is not the RNG states accelerate saves")
    else:
        saved_by = len(list(checkpoint.glob(RNG_FILE.format("*"))))
        rng_note = (f"{checkpoint} holds no RNG state for process {process_index} (saved by {saved_by} "
                    f"process(es)): its masks and other random draws start from the seed, not where the run was")
    return SavedCheckpoint(checkpoint, config, state, rng, optimizer_groups, rng_note)


def check_safetensors(path: Path, expected: dict[str, tuple] | None = None) -> None:
    """The file's header must parse, and (with `expected`: name -> shape) hold exactly those tensors."""
    from safetensors import safe_open
    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise _damaged(path, f"is not a safetensors file ({first_line(err)})") from None
    if expected is None:
        return
    shapes, expected = _plain_names(shapes), _plain_names(expected)
    wrong = [f"{k}: {shapes[k]} in the checkpoint, {expected[k]} here" for k in expected
             if k in shapes and shapes[k] != tuple(expected[k])]
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if wrong or missing or extra:
        detail = "; ".join(wrong[:2] + ([f"missing {', '.join(missing[:3])}"] if missing else [])
                           + ([f"unexpected {', '.join(extra[:3])}"] if extra else []))
        count = len(wrong) + len(missing) + len(extra)
        raise CheckpointError(
            f"cannot resume from {path.parent}: {path.name} holds a model of another shape ({count} tensor(s) "
            f"differ: {detail}). Resume with the model settings it was trained with (its {CONFIG_FILE}), or start "
            f"afresh in another output_dir")


def _plain_names(shapes: dict) -> dict:
    """Tensor names without the prefixes torch.compile and DDP add."""
    return {re.sub(r"(^|\.)(_orig_mod|module)\.", r"\1", k): tuple(v) for k, v in shapes.items()}


def apply_rng_states(states: dict) -> None:
    """Set this process's global RNGs to states saved by accelerate's save_state."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    for key, value in states.items():  # torch_cuda_manual_seed, ...: the accelerator's generators
        match = re.fullmatch(r"torch_(\w+)_manual_seed", key)
        if not match or getattr(torch, match.group(1), None) is None:
            continue
        module = torch.get_device_module(match.group(1))
        if module.is_available():  # a GPU run's checkpoint resumed on a CPU: nothing to set
            if isinstance(value, (list, tuple)):
                module.set_rng_state_all(value)
            else:
                module.set_rng_state(value)
