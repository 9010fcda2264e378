"""log.trackers: accelerate's trackers, TensorBoard by default; an unknown or missing one refused before the run."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import quick_config, read_metrics, run_train
from mpp.config import ConfigError


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the TensorBoard event files in `log_dir`."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("the tensorboard package is not installed: its event files cannot be read back")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    out = tmp_path / "run"
    run_train(quick_config(out, "log.trackers=[tensorboard]", "train.steps=3", "log.every=1"))
    (log_dir,) = [p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")]  # one run, one folder
    logged = scalars(log_dir)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in ("loss", "lr", "img_per_s", "epoch"):
        assert [step for step, _ in logged[name]] == [1, 2, 3], name
        # TensorBoard keeps float32
        assert [value for _, value in logged[name]] == pytest.approx([r[name] for r in records], rel=1e-6), name


def test_unknown_tracker_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        quick_config(tmp_path, "log.trackers=[tensorbord]")
    message = str(err.value)
    assert "\n" not in message and "log.trackers" in message and "'tensorbord'" in message
    assert "tensorboard" in message.split("choose from", 1)[1]  # the valid names, to pick from


@pytest.mark.parametrize("tracker,package", [("wandb", "wandb"), ("comet_ml", "comet-ml")])
def test_missing_tracker_package_is_named_before_the_run(tmp_path, tracker, package):
    from accelerate.tracking import get_available_trackers
    if tracker in {str(t) for t in get_available_trackers()}:
        pytest.skip(f"{tracker} is installed here: nothing is missing")
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_train(quick_config(out, f"log.trackers=[tensorboard, {tracker}]"))
    message = str(err.value)
    assert "\n" not in message and f"pip install {package}" in message and "log.trackers" in message
    assert not out.exists()  # refused before anything was written
