"""Experiment trackers behind one tiny interface: ``log(metrics, step)`` and ``finish()``.

The run folder (``experiments/loop/records.py``) is the record of a run; a tracker is a mirror of it
for live dashboards. So a tracker must never stop a run: W&B errors are reported once and the
tracker turns into a no-op. W&B runs offline unless the config asks for ``online``, and offline
means offline: no network attempt of any kind (tests/test_trackers.py watches the syscalls).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

from experiments.loop.records import process_rank

TRACKER_KINDS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
# what W&B may not do unless it streams (wandb 0.31): system metrics, machine info, git and code
# capture are off, as the run folder records the environment itself (environment.json)
LOCAL_ONLY_SETTINGS = {"x_disable_stats": True, "x_disable_meta": True, "x_disable_machine_info": True,
                       "disable_git": True, "disable_code": True, "save_code": False}


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

    def _init(self, dir: str | Path, mode: str, **kwargs: Any) -> None:
        """Start the W&B run; ``silent`` keeps wandb's banner out of the logs without touching
        ``WANDB_SILENT`` for the rest of the process.

        Not streaming (offline or disabled), the process's W&B settings are made offline too
        (``wandb.setup``): wandb's own analytics (OpenTelemetry) read those, not the run's, and
        otherwise probe the W&B server from a thread at exit (wandb 0.31: a DNS lookup of
        api.forge.coreweave.com); a disabled run's settings would still let them start."""
        import wandb

        settings = {"silent": True}
        if mode != "online":
            settings |= LOCAL_ONLY_SETTINGS
            wandb.setup(settings=wandb.Settings(mode="offline", **LOCAL_ONLY_SETTINGS))
        Path(dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(dir=str(dir), mode=mode, reinit="finish_previous",
                               settings=wandb.Settings(**settings), **kwargs)

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
