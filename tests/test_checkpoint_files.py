"""Checkpoints read back safely: no file of a checkpoint can run code on resume, and every damaged, foreign
or mismatched file stops the resume with one line naming it; a full disk stops a run with the path and the
bytes needed, and leaves the previous checkpoint loadable."""
from __future__ import annotations

import hashlib
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import QUICKSTART, checkpoint_steps, quick_config, read_metrics, run_train, small_overrides
from eval_subset import fresh_accelerate_state  # noqa: F401 (an autouse fixture)

STEP = "step_00000002"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-step run's checkpoint (ViT-Tiny/4, fp32)."""
    from accelerate.state import AcceleratorState
    out = tmp_path_factory.mktemp("base")
    AcceleratorState._reset_state(True)
    run_train(quick_config(out, "train.steps=2", "checkpoint.every=2", "train.mixed_precision=no"))
    AcceleratorState._reset_state(True)
    return out / "checkpoints" / STEP


def resume(out, capsys, *extra: str) -> tuple[int, list[str], str]:
    """`python mpp/pretrain.py` in this process, resuming in `out`: (exit status, its error lines, stderr)."""
    from mpp.pretrain import main
    code = main([str(QUICKSTART), *small_overrides(out, "train.steps=4", "checkpoint.every=2",
                                                    "train.mixed_precision=no", "resume=auto", *extra)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def copied(checkpoint, out):
    target = out / "checkpoints" / STEP
    shutil.copytree(checkpoint, target)
    return target


def digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_refused(code, errors, err, *named: str) -> None:
    assert code == 1, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert all(name in errors[0] for name in named), errors[0]


class Payload:
    """Unpickled, it creates `marker`: the stand-in for a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "state.json", "config.yaml",
         "custom_checkpoint_0.pkl"]  # the last: accelerate unpickles such files in full, mpp writes none


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", FILES)
def test_a_pickle_planted_in_any_file_of_a_checkpoint_never_runs(checkpoint, tmp_path, capsys, name, kind):
    ckpt = copied(checkpoint, tmp_path / "run")
    marker = tmp_path / "marker"
    live = tmp_path / "payload.bin"
    if kind == "torch.save":
        torch.save(Payload(marker), live)
    else:
        live.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    if kind == "torch.save":  # the payload is live: full unpickling runs it
        torch.load(live, weights_only=False)
    else:
        pickle.loads(live.read_bytes())
    assert marker.exists()
    marker.unlink()
    shutil.copy(live, ckpt / name)
    before = digests(ckpt)

    code, errors, err = resume(tmp_path / "run", capsys)
    assert not marker.exists(), f"{name}: the planted pickle ran"
    assert_refused(code, errors, err, name, str(ckpt))
    assert digests(ckpt) == before and read_metrics(tmp_path / "run") == []
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written


def test_the_checkpoint_holds_no_pickled_state(checkpoint):
    # The run's and the loader's state are JSON; the only pickle-format files are torch's weights-only ones.
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.yaml", "model.safetensors", "optimizer.bin",
                                                           "random_states_0.pkl", "state.json"]
    from accelerate.utils import load
    load(checkpoint / "random_states_0.pkl")  # weights only (with numpy's array types)
    torch.load(checkpoint / "optimizer.bin", weights_only=True)


def test_a_checkpoint_without_its_config_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    ckpt = copied(checkpoint, tmp_path / "run")
    (ckpt / "config.yaml").unlink()
    assert_refused(*resume(tmp_path / "run", capsys), "config.yaml", str(ckpt))


def test_weights_of_another_shape_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    ckpt = copied(checkpoint, tmp_path / "run")
    weights = load_file(ckpt / "model.safetensors")
    weights["encoder.cls_token"] = torch.zeros(1, 1, 96)  # a narrower encoder's, config.yaml unchanged
    save_file(weights, ckpt / "model.safetensors")
    code, errors, err = resume(tmp_path / "run", capsys)
    assert_refused(code, errors, err, "model.safetensors", "encoder.cls_token", "(1, 1, 96)", "(1, 1, 192)")
    assert "size mismatch" not in err


def test_a_checkpoint_of_another_model_without_config_is_refused(tmp_path, capsys):
    # The case a traceback used to answer: another model's checkpoint, its config.yaml gone.
    run_train(quick_config(tmp_path / "run", "model.decoder.dim=64", "train.steps=2", "checkpoint.every=2",
                           "train.mixed_precision=no"))
    (tmp_path / "run" / "checkpoints" / STEP / "config.yaml").unlink()
    assert_refused(*resume(tmp_path / "run", capsys), "config.yaml")


@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_a_corrupt_optimizer_state_is_refused_in_one_line(checkpoint, tmp_path, capsys, damage):
    ckpt = copied(checkpoint, tmp_path / "run")
    data = (ckpt / "optimizer.bin").read_bytes()
    (ckpt / "optimizer.bin").write_bytes(data[:len(data) // 2] if damage == "truncated" else bytes(len(data)))
    assert_refused(*resume(tmp_path / "run", capsys), "optimizer.bin", str(ckpt))


# ---- a full disk ----

def bytes_named(message: str) -> int:
    return int(re.search(r"needs about [\d.,]+ MB \(([\d,]+) bytes\)", message).group(1).replace(",", ""))


def test_full_disk_stops_the_run_naming_path_and_bytes_and_keeps_the_last_checkpoint(
        checkpoint, tmp_path, capsys, small_disk, monkeypatch):
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    disk = small_disk.make(int(1.6 * size))  # room for one checkpoint, not two
    out = disk / "run"
    from mpp.pretrain import main

    def run(*extra):
        code = main([str(QUICKSTART), *small_overrides(out, "train.steps=6", "checkpoint.every=2", "log.every=1",
                                                        "train.mixed_precision=no", "resume=auto", *extra)])
        captured = capsys.readouterr()
        return code, [line for line in captured.err.splitlines() if line.startswith("error:")], captured.out + captured.err

    # Checked before writing: the step-4 checkpoint does not fit.
    code, errors, err = run()
    assert_refused(code, errors, err, str(out / "checkpoints" / "step_00000004"), "MB free", STEP)
    assert 0.9 * size < bytes_named(errors[0]) <= size  # the tensors' bytes: the checkpoint less its small files
    assert checkpoint_steps(out) == [2] and not list((out / "checkpoints").glob(".tmp*"))
    kept = digests(out / "checkpoints" / STEP)

    # A disk that fills while the checkpoint is written (here: an estimate that says it fits).
    import mpp.engine
    monkeypatch.setattr(mpp.engine, "tensor_bytes", lambda *state_dicts: 1)
    code, errors, err = run()
    assert_refused(code, errors, err, f"writing checkpoint {out / 'checkpoints' / 'step_00000004'} failed",
                   "is the disk full?", "MB free", STEP)
    assert abs(bytes_named(errors[0]) - size) < 0.01 * size  # the size of the last checkpoint
    assert "resumed from" in err  # the step-2 checkpoint loaded
    assert checkpoint_steps(out) == [2] and not list((out / "checkpoints").glob(".tmp*"))  # its space freed
    assert digests(out / "checkpoints" / STEP) == kept
    monkeypatch.undo()

    # Space freed: the run goes on from the last checkpoint to the end.
    small_disk.resize(disk, 4 * size)
    code, errors, err = run()
    assert code == 0 and not errors, err[-2000:]
    assert f"resumed from {out / 'checkpoints' / STEP} at step 2" in err
    assert checkpoint_steps(out) == [4, 6]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
