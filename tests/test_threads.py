"""The thread policy (experiments/threads.py) on faked machines, and a run that records its choice."""

from __future__ import annotations

import json

import pytest
import torch

import experiments.threads as threads_module
from experiments.threads import THREADS_ALLOWED, check_threads, choose_threads, local_processes

pytestmark = pytest.mark.usefixtures("one_thread")  # the run below sets torch's threads


def auto(cores: int, load: float, processes: int = 1, omp: str | None = None) -> int:
    return choose_threads("auto", usable_cores=cores, load_average=load, local_processes=processes,
                          omp_num_threads=omp).count


@pytest.mark.parametrize("cores, load, processes, expected", [
    (2, 0.0, 1, 2),      # an idle machine: every core
    (2, 0.1, 1, 2),
    (2, 1.0, 1, 1),      # another job holds one of two cores (the README's 10 min 38 s case)
    (2, 0.6, 1, 1),      # rounded: a core busy more than half the minute counts
    (2, 7.5, 1, 1),      # overloaded: still one thread
    (16, 3.2, 1, 13),
    (16, 0.0, 4, 4),     # torchrun --nproc-per-node 4: the cores shared
    (16, 4.0, 4, 3),
    (16, 0.0, 32, 1),    # more processes than cores
    (1, 0.0, 1, 1),
])
def test_auto_takes_the_cores_not_busy_shared_among_local_processes(cores, load, processes, expected):
    assert auto(cores, load, processes) == expected


@pytest.mark.parametrize("cores, load, processes", [(c, x, p) for c in (1, 2, 3, 8, 64)
                                                    for x in (0.0, 0.4, 1.5, 5.0, 100.0) for p in (1, 2, 8)])
def test_auto_is_at_least_one_and_at_most_the_usable_cores(cores, load, processes):
    assert 1 <= auto(cores, load, processes) <= cores


def test_omp_num_threads_set_by_a_launcher_wins_over_auto():
    assert auto(16, 0.0, omp="1") == 1  # the Makefile's parallel targets
    assert auto(2, 1.0, omp="3") == 3   # as asked, even beyond what auto would take
    assert auto(16, 0.0, omp="4,2") == 4  # OpenMP's nested form: the outer level
    for bad in ("0", "abc", "", " "):
        choice = choose_threads("auto", usable_cores=4, load_average=0.0, local_processes=1, omp_num_threads=bad)
        assert choice.count == 4
    assert "ignored" in choose_threads("auto", usable_cores=4, load_average=0.0, local_processes=1,
                                       omp_num_threads="abc").reason


def test_a_number_in_the_config_forces_the_count():
    choice = choose_threads(6, usable_cores=2, load_average=2.0, local_processes=2, omp_num_threads="1")
    assert choice.count == 6 and choice.describe() == "threads: 6 (threads=6)"


def test_the_reason_says_what_was_seen():
    choice = choose_threads("auto", usable_cores=2, load_average=1.04, local_processes=1, omp_num_threads=None)
    assert choice.describe() == "threads: 1 (auto: 2 usable cores, 1 busy (1-min load 1.04))"
    shared = choose_threads("auto", usable_cores=8, load_average=0.0, local_processes=2, omp_num_threads=None)
    assert "shared by 2 processes" in shared.reason


def test_local_processes_from_the_launchers_variables():
    assert local_processes({}) == 1
    assert local_processes({"WORLD_SIZE": "8"}) == 8
    assert local_processes({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 8  # two machines of 8
    assert local_processes({"OMPI_COMM_WORLD_LOCAL_SIZE": "4", "WORLD_SIZE": "8"}) == 4
    assert local_processes({"LOCAL_WORLD_SIZE": "x", "WORLD_SIZE": "2"}) == 2


@pytest.mark.parametrize("value", ["auto", 1, 64])
def test_check_threads_accepts(value):
    assert check_threads(value) == value


@pytest.mark.parametrize("value", [0, -1, 2.0, 2.5, True, None, "Auto", "2", [2]])
def test_check_threads_refuses_in_one_line_naming_the_field(value):
    with pytest.raises(ValueError) as caught:
        check_threads(value)
    assert str(caught.value) == f"threads must be {THREADS_ALLOWED}, got threads={value!r}"


def test_the_machine_readers_answer_sanely():
    assert threads_module.usable_cores() >= 1
    assert threads_module.load_average() >= 0.0


def test_a_run_sets_prints_and_records_its_threads(tmp_path, monkeypatch, capsys):
    from experiments.loop.records import find_runs
    from experiments.run import execute
    from tests.test_configs import compose

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_module, "load_average", lambda: 1.2)
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 3)
    execute(compose("model=stories260k", "method=lora", "train.max_steps=1", "train.warmup_steps=0",
                    "train.batch_size=2", "task.n_pairs=4", "task.eval_pairs=2", "train.eval_steps=[1]",
                    "device=cpu", f"out_root={tmp_path}"))
    assert torch.get_num_threads() == 2
    assert "threads: 2 (auto: 3 usable cores, 1 busy (1-min load 1.20))" in capsys.readouterr().out
    [run] = find_runs(tmp_path)
    assert run["environment"]["threads"] == {"count": 2, "reason": "auto: 3 usable cores, 1 busy (1-min load 1.20)"}
    assert run["environment"]["hardware"]["torch_threads"] == 2
    assert run["config"]["threads"] == "auto"
    assert json.loads((run["dir"] / "summary.json").read_text())["status"] == "completed"
