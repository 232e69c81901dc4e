"""``make gpu-check`` (experiments/gpu_check.py) without a GPU: it stops at once in one line, and its
CPU dry run (``--device cpu --tiny``) runs every part, so the code a GPU would run is exercised here.
The adapter benchmark is its own script (benchmarks/, tests/test_bench_smoke.py): here only the
command line the check calls it with is checked against the script's own ``--help``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import gpu_check
from tests.test_configs import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_without_a_gpu_it_stops_in_one_line_with_a_nonzero_exit(tmp_path):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}  # no GPU, even on a GPU machine
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("gpu-check: no GPU") and "--device cpu --tiny" in line
    assert not (tmp_path / "out").exists()


def test_the_make_target_runs_the_script():
    # Under a parent make (CI runs the suite from `make test`) MAKEFLAGS carries -w, which adds
    # "make[1]: Leaving directory" lines; a clean environment and --no-print-directory keep only the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    recipe = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
    assert recipe.endswith("bin/python experiments/gpu_check.py")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The report of ``--device cpu --tiny``, the benchmark left to its own test."""
    out = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--device", "cpu", "--tiny", "--skip", "bench", "--out", str(out)]) == 0
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_task_kind_ran_three_steps_in_both_dtypes(dry_run):
    report, _ = dry_run
    assert [(row["kind"], row["dtype"]) for row in report["tasks"]] == [
        (kind, dtype) for kind in ("uuid", "sft", "c4") for dtype in ("float32", "bfloat16")]
    for row in report["tasks"]:
        assert row["status"] == "completed" and row["ok"], row
        assert len(row["losses"]) == 3 and all(map(math.isfinite, row["losses"]))
    assert report["passed"] and report["hardware"]["device"] == "cpu"


def test_the_task_runs_trained_in_the_dtype_they_name(dry_run):
    report, _ = dry_run
    out = report["settings"]["out"]
    for row in report["tasks"]:
        [checkpoint] = (Path(out) / "runs" / f"{row['kind']}-{row['dtype']}").rglob("checkpoint.pt")
        weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["weights"]
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {getattr(torch, row["dtype"])}


def test_whole_model_arms_are_timed_side_by_side(dry_run):
    report, markdown = dry_run
    whole = report["whole_model"]
    assert [r["arm"] for r in whole["arms"]] == ["lora r=2", "mora r=2 rotate", "lora r=16", "mora r=16 share"]
    assert all(r["median_ms"] > 0 and r["trainable_parameters"] > 0 for r in whole["arms"])
    [small, large] = whole["ratios"]
    assert (small["mora"], small["lora"], small["paper_at_most"]) == ("mora r=2 rotate", "lora r=2", 1.15)
    assert large["step_time_ratio"] > 0 and large["memory_ratio"] is None  # no CUDA allocator on the CPU
    assert "| mora r=2 rotate / lora r=2 |" in markdown and "<= 1.15x" in markdown


def test_exactness_covers_every_operator_layout_and_holds(dry_run):
    report, markdown = dry_run
    exact = report["exactness"]
    layouts = {case["layout"] for case in exact["cases"]}
    # truncate, decouple, rotate: 2 paddings each; share: 2 x 2 group kinds x 2 paddings
    assert len(layouts) == 14 and {"share-block-cyclic-zero", "rotate-cyclic-cyclic-wrap"} <= layouts
    assert len(exact["cases"]) == 14 * len(gpu_check.EXACT_SHAPES) and exact["ok"]
    assert exact["worst"]["merged_vs_unmerged_float64"] < 1e-12  # Eq. 3, float64
    assert "| share-block-block-wrap |" in markdown


def test_exactness_catches_a_merge_that_is_off_by_a_little(monkeypatch):
    from mora.layer import MoRAAdapter

    delta_weight = MoRAAdapter.delta_weight
    monkeypatch.setattr(MoRAAdapter, "delta_weight", lambda self: delta_weight(self) * (1 + 1e-7))
    case = gpu_check.exactness_case(37, 53, 8, ("share", "cyclic", "cyclic", "wrap"), "cpu")
    assert not case["ok"] and case["errors"]["merged_vs_unmerged_float64"] > 1e-10
    assert case["errors"]["merged_vs_unmerged_float32"] < 1e-4  # too small for float32 to see


def test_the_benchmark_command_uses_only_options_the_benchmark_has(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda command, **kwargs: calls.append(command) or
                        subprocess.CompletedProcess(command, 1, "", "not run"))
    row = gpu_check.adapter_benchmark(gpu_check.parse_args(["--device", "cpu", "--tiny", "--out", str(tmp_path)]))
    assert not row["ok"] and row["returncode"] == 1  # a failing benchmark is reported, not raised
    monkeypatch.undo()  # the real subprocess.run again
    [command] = calls
    assert command[1] == str(REPO / "benchmarks" / "bench_adapters.py")
    usage = subprocess.run([sys.executable, command[1], "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120).stdout
    assert all(option in usage for option in command[2:] if option.startswith("--"))
