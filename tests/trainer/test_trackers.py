import importlib.util

import pytest

from lisa_trainer.trackers import Trackers, parse_report_to

RECORDS = [
    {"kind": "config", "step": 0, "model": "tiny", "lr": 1e-3},
    {"kind": "step", "step": 1, "loss": 5.5, "lr": 1e-3, "active_layers": [1, 4], "grad_norm": float("nan")},
    {"kind": "step", "step": 2, "loss": 5.0, "lr": 1e-3, "active_layers": [1, 4], "skipped": False},
    {"kind": "eval", "step": 2, "eval_loss": 5.2},
]


@pytest.mark.parametrize("value, names", [("none", []), ("all", ["tensorboard", "wandb"]), ("wandb", ["wandb"]),
                                          ("tensorboard,wandb", ["tensorboard", "wandb"]), (["tensorboard"], ["tensorboard"])])
def test_report_to_values(value, names):
    assert parse_report_to(value) == names


def test_unknown_tracker_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown tracker.* mlflow; use none, all or any of tensorboard, wandb"):
        parse_report_to("tensorboard mlflow")


def test_tensorboard_gets_the_numbers_of_each_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = Trackers(["tensorboard"], tmp_path, run_name="run1", config={"lr": 1e-3})
    for record in RECORDS:
        trackers.log(record)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "runs" / "run1"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["config/lr", "eval/eval_loss", "step/loss", "step/lr"]
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(1, 5.5), (2, 5.0)]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers = Trackers(["wandb"], tmp_path, run_name="run1")
    for record in RECORDS:
        trackers.log(record)
    trackers.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_missing_package_gives_one_warning_and_training_goes_on(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.warns(UserWarning, match=r"--report_to wandb: the 'wandb' package is not installed \(pip install wandb\)") as seen:
        trackers = Trackers(["wandb"], tmp_path)
    assert len(seen) == 1 and trackers.open == []
    trackers.log(RECORDS[1])
    trackers.close()
