"""How many CPU threads a run computes with (config key ``threads``), chosen once before any work.

torch's default, one thread per core, assumes an idle machine; when another job holds a core, the
threads of each matmul wait for the one that shares it: a 300-step UUID run took 10 min 38 s with
the default threads while another job held the second of two cores, and about 60 s with one thread.

``threads: auto`` (the default) takes ``OMP_NUM_THREADS`` when the launcher set it (the Makefile's
parallel targets set 1 per run, torchrun 1 per process); otherwise the cores this process may use
less the cores already busy (the 1-minute load average, rounded), shared among the processes a
distributed launch started on this machine; at least 1. ``threads: N`` forces N.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

THREADS_ALLOWED = "auto or a positive integer"
# launchers' count of the processes on this machine (torchrun and accelerate, Open MPI), then of all
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "WORLD_SIZE")


@dataclass(frozen=True)
class ThreadChoice:
    """The number of threads and why."""

    count: int
    reason: str

    def describe(self) -> str:
        return f"threads: {self.count} ({self.reason})"


def check_threads(value) -> int | str:
    """The config value ``threads``: ``"auto"`` or a positive integer (a bool is not one)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"threads must be {THREADS_ALLOWED}, got threads={value!r}")


def choose_threads(setting: int | str, *, usable_cores: int, load_average: float, local_processes: int,
                   omp_num_threads: str | None) -> ThreadChoice:
    """The policy, as a pure function of what the machine reports (``threads: auto`` above)."""
    if setting != "auto":
        return ThreadChoice(setting, f"threads={setting}")
    omp = _positive_int(omp_num_threads.split(",")[0]) if omp_num_threads else None
    if omp is not None:
        return ThreadChoice(omp, f"OMP_NUM_THREADS={omp_num_threads}")
    busy = max(0, round(load_average))
    count = max(1, (usable_cores - busy) // max(1, local_processes))
    reason = f"auto: {usable_cores} usable cores, {busy} busy (1-min load {load_average:.2f})"
    if local_processes > 1:
        reason += f", shared by {local_processes} processes on this machine"
    if omp_num_threads:
        reason += f"; OMP_NUM_THREADS={omp_num_threads!r} ignored (not a positive integer)"
    return ThreadChoice(count, reason)


def machine_threads(setting: int | str) -> ThreadChoice:
    """:func:`choose_threads` with this machine's cores, load and launcher."""
    return choose_threads(setting, usable_cores=usable_cores(), load_average=load_average(),
                          local_processes=local_processes(os.environ),
                          omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:  # "max 100000", or "<quota> <period>" in microseconds
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2, or no quota ("max")
        return cores


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def local_processes(environ: Mapping[str, str]) -> int:
    """How many processes of this run share this machine (1 when launched alone)."""
    for name in LOCAL_SIZE_VARIABLES:
        count = _positive_int(environ.get(name, ""))
        if count is not None:
            return count
    return 1


def _positive_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and int(text) >= 1 else None
