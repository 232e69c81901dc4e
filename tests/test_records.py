"""Run folders: write, resume, read back, filter; atomic writes; the environment record."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from experiments.files import atomic_torch_save, atomic_write_bytes
from experiments.loop.records import (WRITER_LOCK, RunRecord, check_not_being_written, find_runs, git_state,
                                      read_run)
from tests.test_configs import REPO

CONFIG = {"method": {"name": "mora", "operator": "share"}, "rank": 8, "lr": 3e-4, "resume": False,
          "logger": "none", "tags": ["a", "b"]}


def make_run(run_dir, config=CONFIG, steps=(1, 2, 3), status="completed"):
    record = RunRecord.create(run_dir, config, resume=False)
    for step in steps:
        record.log(step, loss=1.0 / step)
    record.write_summary({"status": status, "final_loss": 1.0 / steps[-1]})
    return record


def test_round_trip(tmp_path):
    record = RunRecord.create(tmp_path / "run", CONFIG, resume=False)
    record.log(1, loss=torch.tensor(2.5), lr=1e-4)
    record.log(2, loss=float("nan"))
    written = record.write_summary({"status": "diverged", "diverged_at": 2})
    run = read_run(tmp_path / "run")
    assert run["config"] == CONFIG
    assert list(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())) == list(CONFIG)  # order kept
    assert [m["step"] for m in run["metrics"]] == [1, 2]
    assert run["metrics"][0]["loss"] == 2.5 and math.isnan(run["metrics"][1]["loss"])
    assert 0 <= run["metrics"][0]["time"] <= run["metrics"][1]["time"]
    assert run["summary"] == written and written["status"] == "diverged" and written["diverged_at"] == 2
    assert written["wall_time_s"] >= run["metrics"][1]["time"]
    assert run["environment"]["versions"]["torch"] == torch.__version__


def test_summary_status_is_checked(tmp_path):
    record = RunRecord.create(tmp_path, CONFIG, resume=False)
    with pytest.raises(ValueError, match="status"):
        record.write_summary({"status": "done"})
    assert read_run(tmp_path)["summary"] is None


def test_fresh_start_refuses_existing_run(tmp_path):
    make_run(tmp_path)
    with pytest.raises(FileExistsError):
        RunRecord.create(tmp_path, CONFIG, resume=False)


def test_resume_truncates_and_keeps_clock(tmp_path):
    make_run(tmp_path, steps=(1, 2, 3, 4))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "ti')  # a crash mid-write
    record = RunRecord.create(tmp_path, {**CONFIG, "resume": True, "logger": "wandb"}, resume=True,
                              ignore_on_resume=("resume", "logger"))
    record.truncate_after(2)
    time_at_2 = read_run(tmp_path)["metrics"][-1]["time"]
    record.log(3, loss=0.0)
    run = read_run(tmp_path)
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3]
    assert run["metrics"][-1]["time"] >= time_at_2
    assert run["summary"] is None  # the earlier session's summary no longer describes the run
    assert run["config"]["logger"] == "wandb"
    assert len(run["environment"]["resumes"]) == 1


def test_resume_refuses_changed_config(tmp_path):
    make_run(tmp_path)
    changed = {**CONFIG, "lr": 1e-3, "method": {"name": "mora", "operator": "rotate"}, "resume": True}
    with pytest.raises(ValueError, match=r"lr: 0\.0003 -> 0\.001.*method\.operator: 'share' -> 'rotate'"):
        RunRecord.create(tmp_path, changed, resume=True, ignore_on_resume=("resume",))
    with pytest.raises(ValueError, match="resume: False -> True"):
        RunRecord.create(tmp_path, {**CONFIG, "resume": True}, resume=True)


def test_resume_of_missing_run_starts_fresh(tmp_path):
    record = RunRecord.create(tmp_path / "new", CONFIG, resume=True)
    record.log(1, loss=1.0)
    assert len(read_run(tmp_path / "new")["metrics"]) == 1


def test_find_runs_filters_on_dotted_keys(tmp_path):
    make_run(tmp_path / "mora_r8")
    make_run(tmp_path / "mora_r16", {**CONFIG, "rank": 16})
    make_run(tmp_path / "lora" / "r8", {**CONFIG, "method": {"name": "lora"}})
    (tmp_path / "mora_r8" / "wandb" / "files").mkdir(parents=True)  # W&B's own config.yaml is no run
    (tmp_path / "mora_r8" / "wandb" / "files" / "config.yaml").write_text("rank: 8\n")
    assert len(find_runs(tmp_path)) == 3
    found = find_runs(tmp_path, **{"method.name": "mora", "rank": 8})
    assert [run["dir"].name for run in found] == ["mora_r8"]
    assert [run["dir"].name for run in find_runs(tmp_path, rank=8)] == ["r8", "mora_r8"]
    assert find_runs(tmp_path, **{"method.operator.kind": "share"}) == []


def test_atomic_torch_save_keeps_old_file_when_serialization_fails(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    with pytest.raises(RuntimeError):
        atomic_torch_save(Unpicklable(), tmp_path / "never.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_atomic_write_bytes(tmp_path):
    atomic_write_bytes(tmp_path / "x.bin", b"old")
    atomic_write_bytes(tmp_path / "x.bin", b"new")
    assert (tmp_path / "x.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_environment_git_sha(tmp_path, monkeypatch):
    make_run(tmp_path / "run")
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_sha"])
    assert (env["git_sha"] is None) == (env["git_dirty"] is None)
    assert env["hardware"]["cpu_count"] >= 1 and env["started_at"].endswith("+00:00")
    assert set(env["versions"]) >= {"python", "torch", "transformers", "peft", "wandb", "hydra-core", "lm-eval"}
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path is not a checkout
    assert git_state(tmp_path) == (None, None)


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    """A make target started twice took a live run for an interrupted one and appended to its metrics;
    the writer lock refuses the second process instead, and lets go when the first ends."""
    run_dir = tmp_path / "run"
    first = RunRecord.create(run_dir, CONFIG, resume=False)
    first.log(1, loss=1.0)
    other = subprocess.run([sys.executable, "-c", (
        "import sys; from experiments.loop.records import RunRecord, check_not_being_written\n"
        f"for attempt in (lambda: check_not_being_written({str(run_dir)!r}),\n"
        f"                lambda: RunRecord.create({str(run_dir)!r}, {CONFIG!r}, resume=True)):\n"
        "    try: attempt(); print('passed')\n"
        "    except BlockingIOError as err: print('refused:', err)\n")],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = other.stdout.strip().splitlines()
    assert len(lines) == 2 and all(f"refused: {run_dir} is being written by another live process (pid "
                                   f"{os.getpid()})" in line for line in lines), other.stdout + other.stderr
    assert [m["step"] for m in read_run(run_dir)["metrics"]] == [1]  # the refused writer touched nothing
    first.write_summary({"status": "completed"})  # the run's end lets the folder go
    check_not_being_written(run_dir)
    resumed = RunRecord.create(run_dir, CONFIG, resume=True)
    assert (run_dir / WRITER_LOCK).exists()
    resumed.close()


def test_a_dead_writers_folder_resumes(tmp_path):
    """A killed run leaves its lock file, but not the lock: the kernel drops it with the process."""
    run_dir = tmp_path / "run"
    script = (f"from experiments.loop.records import RunRecord\n"
              f"r = RunRecord.create({str(run_dir)!r}, {CONFIG!r}, resume=False); r.log(1, loss=1.0)\n"
              "import os; os._exit(9)  # no summary, no close: as if killed\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 9, done.stderr
    record = RunRecord.create(run_dir, CONFIG, resume=True)
    record.log(2, loss=0.5)
    record.write_summary({"status": "completed"})
    assert [m["step"] for m in read_run(run_dir)["metrics"]] == [1, 2]
