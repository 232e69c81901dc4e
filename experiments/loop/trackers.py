"""Experiment trackers behind one tiny interface: ``log(metrics, step)`` and ``finish()``.

The run folder (``experiments/loop/records.py``) is the record of a run; a tracker is a mirror of it
for live dashboards. So a tracker must never stop a run: W&B errors are reported once and the
tracker turns into a no-op. W&B runs offline unless the config asks for ``online``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

from experiments.loop.records import process_rank

TRACKER_KINDS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


class Tracker(Protocol):
    """What the training loop needs from a tracker."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Tracks nothing (``logger=none``); the run folder still records everything."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Do nothing."""

    def finish(self) -> None:
        """Do nothing."""


class WandbTracker:
    """A W&B run whose files live under ``dir`` (``dir/wandb/``), silent, offline by default.

    Any exception from wandb (init, log or finish) is turned into one ``RuntimeWarning``, after
    which the tracker does nothing: losing the dashboard must not lose the run.
    """

    def __init__(self, project: str, run_name: str, config: dict, mode: str = "offline",
                 dir: str | Path = ".", group: str | None = None, tags: tuple[str, ...] = ()):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        self._run = None
        self._guard("init", self._init, project=project, name=run_name, config=config, mode=mode,
                    dir=dir, group=group, tags=list(tags))

    def _init(self, dir: str | Path, **kwargs: Any) -> None:
        """Start the W&B run; ``silent`` keeps wandb's banner out of the logs without touching
        ``WANDB_SILENT`` for the rest of the process."""
        import wandb

        Path(dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(dir=str(dir), reinit="finish_previous",
                               settings=wandb.Settings(silent=True), **kwargs)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Send ``metrics`` at ``step`` (no-op once W&B has failed)."""
        if self._run is not None:
            self._guard("log", self._run.log, dict(metrics), step=step)

    def finish(self) -> None:
        """Close the W&B run (offline: flush its files); later calls do nothing."""
        if self._run is not None:
            run, self._run = self._run, None
            self._guard("finish", run.finish)

    def _guard(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Call ``fn``; on any exception warn and stop using W&B for the rest of the run."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # a tracker failure must never end the run
            self._run = None
            warnings.warn(f"W&B {action} failed ({exc!r}); continuing without W&B tracking",
                          RuntimeWarning, stacklevel=3)


def make_tracker(kind: str, **kwargs: Any) -> Tracker:
    """The tracker for config field ``logger``: ``"none"`` (ignores ``kwargs``) or ``"wandb"``
    (``kwargs`` go to :class:`WandbTracker`). Under a distributed launcher only rank 0 tracks,
    as only it writes the run folder: the other ranks get a :class:`NullTracker`."""
    if kind not in TRACKER_KINDS:
        raise ValueError(f"logger must be one of {TRACKER_KINDS}, got {kind!r}")
    if kind == "none" or process_rank() != 0:
        return NullTracker()
    return WandbTracker(**kwargs)
