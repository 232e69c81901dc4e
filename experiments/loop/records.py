"""Run folders: the files every run leaves behind, and the readers analysis code uses.

A run folder holds

- ``config.yaml``: the resolved config, exactly what the run was given;
- ``environment.json``: git SHA and dirty flag, package versions, hardware, start time, command
  line, and what the caller adds (the entry point: the thread count and why); each resumed session
  appends its own environment under ``"resumes"``;
- ``metrics.jsonl``: one ``{"step", "time", ...}`` object per line, fsynced as it is written;
- ``summary.json``: written once at the end (``status`` and whatever the caller reports); absent
  while the run is in progress or if it died without a word;
- ``.writer.lock``: held (``flock``) by the one process writing the folder, so a second process (a
  ``make`` target started twice, whose ``skip_completed`` would take the live run for an interrupted one)
  is refused instead of appending to the same metrics; the kernel drops the lock when the writer dies,
  so an interrupted run can be resumed at once.

Under a distributed launcher (torchrun, ``accelerate launch``) every process builds a
:class:`RunRecord`, but only global rank 0 writes the folder (:func:`process_rank`); the others get
a record whose writes do nothing, so one run leaves one folder, one metrics file, one summary.

Tables, figures and notebooks read runs only through :func:`read_run` and :func:`find_runs`, which
need nothing beyond json and yaml. Every whole-file write is atomic (temp file in the same folder,
fsync, ``os.replace``), so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from experiments.files import atomic_write_text
from experiments.paths import REPO_ROOT

CONFIG, ENVIRONMENT, METRICS, SUMMARY = "config.yaml", "environment.json", "metrics.jsonl", "summary.json"
WRITER_LOCK = ".writer.lock"
STATUSES = ("completed", "failed", "diverged")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "wandb", "hydra-core", "lm-eval")
_MISSING = object()


class RunRecord:
    """Writer for one run folder; build it with :meth:`create`.

    ``time`` in the metrics and ``wall_time_s`` in the summary count seconds of running since the
    run began, summed over resumed sessions (a crashed session counts up to its last logged line).
    """

    def __init__(self, run_dir: str | Path, writer: bool = True):
        self.dir = Path(run_dir)
        self.writer = writer  # False on ranks other than 0: log/truncate/summary write nothing
        self._elapsed_before = 0.0
        self._started = time.monotonic()
        self._lock: int | None = None  # the writer lock's descriptor while this record holds it

    def close(self) -> None:
        """Release the folder's writer lock: done by :meth:`write_summary`, the record's end, by garbage
        collection and by the end of the process, whichever comes first."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    __del__ = close

    @classmethod
    def create(cls, run_dir: str | Path, config: dict, *, resume: bool,
               ignore_on_resume: tuple[str, ...] = (), environment: dict | None = None) -> RunRecord:
        """Start (or, with ``resume`` and an existing run there, continue) the run in ``run_dir``.

        Resuming refuses a config that differs from the saved one except at the dotted keys in
        ``ignore_on_resume`` (a key also covers everything under it), keeps ``metrics.jsonl`` and
        ``summary.json`` (call :meth:`truncate_after` with the checkpoint's step once it has loaded)
        and rewrites ``config.yaml`` so it shows the ignored keys' new values. ``environment`` adds
        entries to this session's ``environment.json``.
        A fresh start refuses a folder that already holds a run rather than overwrite it
        (:func:`check_run_folder`); any start refuses a folder another live process writes (the record
        holds ``WRITER_LOCK`` until :meth:`write_summary`). On a rank other than 0 nothing is checked or written (rank 0
        does both).
        """
        run_dir = Path(run_dir)
        if process_rank() != 0:
            return cls(run_dir, writer=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _take_writer_lock(run_dir)  # before the checks below, so no second writer passes them meanwhile
        try:
            resuming = check_run_folder(run_dir, config, resume=resume, ignore_on_resume=ignore_on_resume)
            atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
            _write_environment(run_dir, resuming, environment or {})
        except BaseException:
            os.close(lock)
            raise
        record = cls(run_dir)
        record._lock = lock
        if resuming:
            record._keep_metrics(float("inf"))  # drops a torn last line before we append after it
        else:
            atomic_write_text(run_dir / METRICS, "")
        return record

    def elapsed(self) -> float:
        """Seconds of running so far, earlier sessions included."""
        return self._elapsed_before + time.monotonic() - self._started

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step", "time", **metrics}`` to ``metrics.jsonl`` and fsync it.

        Values may be plain numbers/strings or 0-d tensors / numpy scalars (anything with
        ``.item()``); NaN and inf are written as JSON's ``NaN``/``Infinity``, which Python reads back.
        """
        if "time" in metrics:
            raise ValueError("'time' is reserved in metrics.jsonl for the run's elapsed seconds")
        if not self.writer:
            return
        line = json.dumps({"step": int(step), "time": round(self.elapsed(), 3), **metrics}, default=_scalar)
        with open(self.dir / METRICS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int | float) -> None:
        """Continue the run after ``step`` (0: from the start): drop the metrics logged after it (a
        resumed run logs them again) and the earlier session's ``summary.json`` (it no longer
        describes the run), and restart the clock from the last line kept. A resumed run calls
        this once its checkpoint has loaded, so a checkpoint that cannot be read leaves a finished
        run's summary in place."""
        if not self.writer:
            return
        self._keep_metrics(step)
        (self.dir / SUMMARY).unlink(missing_ok=True)

    def _keep_metrics(self, step: int | float) -> None:
        kept = [m for m in _read_jsonl(self.dir / METRICS) if m["step"] <= step]
        atomic_write_text(self.dir / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
        self._elapsed_before = kept[-1]["time"] if kept else 0.0
        self._started = time.monotonic()

    def write_summary(self, summary: dict) -> dict:
        """Atomically write ``summary.json``: ``summary`` (whose ``status`` must be one of
        ``STATUSES``) plus ``wall_time_s`` and ``finished_at``; returns what was written."""
        if summary.get("status") not in STATUSES:
            raise ValueError(f"summary status must be one of {STATUSES}, got {summary.get('status')!r}")
        full = {"status": summary["status"], **summary, "wall_time_s": round(self.elapsed(), 3),
                "finished_at": _now_iso()}
        if not self.writer:
            return full
        atomic_write_text(self.dir / SUMMARY, json.dumps(full, indent=2, default=_scalar) + "\n")
        self.close()  # the summary is a run's last word
        return full


def process_rank() -> int:
    """This process's global rank as distributed launchers set it (torchrun and ``accelerate
    launch`` set ``RANK``, MPI its own variable); 0 for a process launched alone."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def world_size() -> int:
    """How many processes the launcher started (1 when launched alone)."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _scalar(value: Any) -> Any:
    """JSON fallback for 0-d tensors and numpy scalars."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- environment


def git_state(path: str | Path) -> tuple[str | None, bool | None]:
    """(HEAD SHA, dirty) of the git checkout holding ``path``; (None, None) outside one.

    Untracked files count as dirty: an uncommitted new module changes what ran.
    """
    sha = _git(path, "rev-parse", "HEAD")
    if sha is None:
        return None, None
    status = _git(path, "status", "--porcelain")
    return sha, None if status is None else bool(status)


def _git(path: str | Path, *args: str) -> str | None:
    """Stripped stdout of ``git -C path args``, or None if git is missing or fails."""
    try:
        done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    """Python and the installed versions of ``PACKAGES`` (None where not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    """Platform, CPU model and counts, RAM, torch threads, CUDA devices (when torch is here) and
    the number of processes the run was launched with."""
    info = {"platform": platform.platform(), "processor": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ram_gib": _ram_gib(), "torch_threads": None, "cuda_devices": [], "world_size": world_size()}
    try:
        import torch
    except ImportError:
        return info
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_model() -> str | None:
    """The first ``model name`` in /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def collect_environment() -> dict[str, Any]:
    """What ``environment.json`` records about this session; the SHA is that of this repo."""
    sha, dirty = git_state(REPO_ROOT)
    return {"git_sha": sha, "git_dirty": dirty, "versions": package_versions(), "hardware": hardware(),
            "started_at": _now_iso(), "command": [sys.executable, *sys.argv]}


def _write_environment(run_dir: Path, resuming: bool, extra: dict) -> None:
    """Write this session's environment (plus ``extra``); a resumed session is appended under
    ``"resumes"`` so the first session's record survives."""
    env, path = collect_environment() | extra, run_dir / ENVIRONMENT
    if resuming and path.exists():
        first = json.loads(path.read_text())
        first.setdefault("resumes", []).append(env)
        env = first
    atomic_write_text(path, json.dumps(env, indent=2) + "\n")


# ---------------------------------------------------------------- configs


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists and empty dicts are leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _covered(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether dotted ``key`` is one of ``prefixes`` or lies under one."""
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def config_differences(run_dir: Path, config: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``"key: old -> new"`` for every dotted key (outside ``ignore``) where ``config`` differs from
    the ``config.yaml`` saved in ``run_dir``."""
    old = flatten(yaml.safe_load((Path(run_dir) / CONFIG).read_text()) or {})
    new = flatten(yaml.safe_load(yaml.safe_dump(config)) or {})  # compare as YAML reads back
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in sorted(old.keys() | new.keys())
            if not _covered(k, ignore) and old.get(k, _MISSING) != new.get(k, _MISSING)]


def check_run_folder(run_dir: str | Path, config: dict, *, resume: bool,
                     ignore_on_resume: tuple[str, ...] = ()) -> bool:
    """What :meth:`RunRecord.create` refuses, checked leaving nothing behind, so a caller can refuse
    before loading a model: a folder that holds a run (unless ``resume``), a resumed config that
    differs (:func:`config_differences`), a place where no folder can be made (tried: an empty
    folder is made and removed in the nearest folder that exists). Returns
    whether the run there would be resumed. Ranks other than 0 check nothing (rank 0 writes)."""
    run_dir = Path(run_dir)
    if process_rank() != 0:
        return False
    resuming = resume and (run_dir / CONFIG).exists()
    if resuming:
        _check_resumable(run_dir, config, ignore_on_resume)
    elif (run_dir / CONFIG).exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it (resume=true) or choose another "
                              "folder (out_dir, out_root)")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot make the run folder {run_dir}: {existing} is not a folder; choose "
                                 "another out_dir or out_root")
    try:  # os.access says yes to root on a read-only or special file system (/proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as err:
        raise PermissionError(f"cannot make the run folder {run_dir}: {existing} is not writable "
                              f"({err.strerror}); choose another out_dir or out_root") from err
    return resuming


def _take_writer_lock(run_dir: Path) -> int:
    """The descriptor of ``run_dir``'s writer lock, taken without waiting; raises BlockingIOError naming
    the process that holds it."""
    fd = os.open(run_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BlockingIOError(f"{run_dir} is being written by another live process (pid {holder}); wait for it "
                              "to end or stop it, then rerun (an interrupted run resumes)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_not_being_written(run_dir: str | Path) -> None:
    """Raise BlockingIOError when a live process holds ``run_dir``'s writer lock (see the module's
    docstring); a folder without one, or whose writer died, passes. Leaves no file behind."""
    path = Path(run_dir) / WRITER_LOCK
    if process_rank() == 0 and path.exists():
        os.close(_take_writer_lock(Path(run_dir)))


def _check_resumable(run_dir: Path, config: dict, ignore: tuple[str, ...]) -> None:
    """Raise ValueError naming every dotted key (outside ``ignore``) where ``config`` differs
    from the saved ``config.yaml``."""
    diffs = config_differences(run_dir, config, ignore)
    if diffs:
        raise ValueError(f"cannot resume {run_dir}: config differs from its config.yaml at "
                         f"{'; '.join(diffs)} (only {list(ignore)} may change on resume)")


# ---------------------------------------------------------------- readers


def _read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSON-lines file ([] if absent); a torn last line (a crash mid-write) is
    skipped, a bad line anywhere else is an error."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    with contextlib.suppress(json.JSONDecodeError):
        rows += [json.loads(line) for line in lines[-1:]]
    return rows


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"dir", "config", "metrics", "summary", "environment"}`` of one run folder; summary and
    environment are None when absent."""
    run_dir = Path(run_dir)
    return {"dir": run_dir, "config": yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {},
            "metrics": _read_jsonl(run_dir / METRICS), "summary": _read_json(run_dir / SUMMARY),
            "environment": _read_json(run_dir / ENVIRONMENT)}


def _run_dirs(root: Path):
    """Run folders under ``root`` (those with config.yaml and environment.json), in path order;
    nothing inside a run folder (e.g. W&B's own ``files/config.yaml``) is searched."""
    for current, dirnames, filenames in os.walk(root):
        if CONFIG in filenames and ENVIRONMENT in filenames:
            dirnames.clear()
            yield Path(current)
        dirnames.sort()


def _lookup(config: dict, dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``, or ``_MISSING``."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


def find_runs(root: str | Path, **config_filters: Any) -> list[dict[str, Any]]:
    """:func:`read_run` of every run under ``root`` whose config equals each dotted-key filter,
    e.g. ``find_runs(root, **{"method.name": "mora", "rank": 8})``; a missing key never matches."""
    runs = []
    for run_dir in _run_dirs(Path(root)):
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
        if all(_lookup(config, key) == value for key, value in config_filters.items()):
            runs.append(read_run(run_dir))
    return runs
