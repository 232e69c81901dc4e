"""Trackers: the no-op, W&B offline under the run folder, and W&B failures that never end a run."""

import os
import warnings

import pytest
import wandb

from experiments.loop.trackers import NullTracker, WandbTracker, make_tracker


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keep W&B's config, cache and staging files inside the test's folder."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))
    for var in ("WANDB_SILENT", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_null_tracker():
    tracker = make_tracker("none", project="ignored")
    assert isinstance(tracker, NullTracker)
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()


def test_wandb_offline_writes_under_run_dir(wandb_home):
    run_dir = wandb_home / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a degraded tracker would pass silently
        tracker = make_tracker("wandb", project="mora-test", run_name="r", config={"rank": 8}, dir=run_dir)
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
        tracker.finish()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "WANDB_SILENT" not in os.environ


def test_wandb_init_failure_warns_once_then_no_ops(wandb_home, monkeypatch):
    def broken_init(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="W&B init failed") as caught:
        tracker = WandbTracker("p", "r", {}, dir=wandb_home)
        for step in range(3):
            tracker.log({"loss": 1.0}, step=step)
        tracker.finish()
    assert len(caught) == 1


def test_wandb_log_failure_warns_once_and_stops_calling(wandb_home, monkeypatch):
    class BrokenRun:
        calls = 0

        def log(self, metrics, step):
            BrokenRun.calls += 1
            raise OSError("disk full")

        def finish(self):
            raise AssertionError("a failed run is not touched again")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    with pytest.warns(RuntimeWarning, match="W&B log failed") as caught:
        tracker = WandbTracker("p", "r", {}, dir=wandb_home)
        for step in range(3):
            tracker.log({"loss": 1.0}, step=step)
        tracker.finish()
    assert len(caught) == 1 and BrokenRun.calls == 1


def test_bad_kind_and_mode_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="logger must be one of"):
        make_tracker("tensorboard")
    with pytest.raises(ValueError, match="mode"):
        WandbTracker("p", "r", {}, mode="offlien", dir=tmp_path)
