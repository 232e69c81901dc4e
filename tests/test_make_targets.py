"""Targets split to fit the 30-min wall clock (issue 12) still run what their aggregates promise.

Dry runs only (``make -n``: recipes are printed, nothing runs), so this takes a second.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from benchmarks import bench_adapters, report

REPO = Path(__file__).resolve().parents[1]


def dry_run(target: str, *overrides: str) -> str:
    # Under a parent make (CI runs the suite from `make test`) MAKEFLAGS carries -w and the parent's flags;
    # a clean environment keeps only this target's recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", target, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sweep_budgets(recipe: str) -> list[int]:
    """The step budgets the C4 tokens sweep's loops run, in order."""
    return [int(steps) for loop in re.findall(r"for s in ([\d ]+); do", recipe) for steps in loop.split()]


def default_sweep_budgets() -> list[int]:
    (value,) = re.findall(r"^C4_SWEEP_STEPS \?= ([\d ]+)$", (REPO / "Makefile").read_text(), re.M)
    return [int(steps) for steps in value.split()]


def test_the_two_halves_of_the_c4_tokens_sweep_run_each_default_budget_once():
    short, long = sweep_budgets(dry_run("c4-tokens-sweep-short")), sweep_budgets(dry_run("c4-tokens-sweep-long"))
    assert short and long and not set(short) & set(long)
    assert sorted(short + long) == sorted(default_sweep_budgets())
    assert max(short) < min(long)  # the cheap budgets in one target, the dear one in the other


def test_the_whole_tokens_sweep_runs_table3_then_every_budget():
    recipe = dry_run("c4-tokens-sweep")
    table3 = recipe.index("experiment=pretrain_c4 method=fft,lora,mora,relora,remora")
    assert table3 < recipe.index("for s in")
    assert sorted(sweep_budgets(recipe)) == sorted(default_sweep_budgets())
    assert recipe.rstrip().splitlines()[-1].endswith("analysis c4-tokens --runs results/runs results/c4_tokens_sweep "
                                                     "--out reports/pretrain")


def test_a_budget_given_on_the_command_line_reaches_both_halves():
    assert sweep_budgets(dry_run("c4-tokens-sweep-short", "C4_SWEEP_STEPS=4000")) == [4000]
    assert sweep_budgets(dry_run("c4-tokens-sweep-long", "C4_SWEEP_STEPS=4000")) == [4000]


def test_table4_runs_only_the_four_operators_at_both_ranks():
    recipe = dry_run("table4")
    runs = [line for line in recipe.splitlines() if "experiments/run.py" in line]
    assert len(runs) == 1 and "method=mora method.operator=truncate,share,decouple,rotate" in runs[0]
    assert "for r in 8 256" in recipe
    assert "finetune_r$r" in runs[0] and "task=metamath" in runs[0]


def sweep_seeds(recipe: str) -> list[str]:
    return [seed for value in re.findall(r" seed=([\d,]+) ", recipe) for seed in value.split(",")]


def test_the_long_budget_in_parts_of_one_seed_runs_each_seed_of_the_whole_once():
    whole = dry_run("c4-tokens-sweep-long")
    parts = [dry_run(f"c4-tokens-sweep-long-s{seed}") for seed in sweep_seeds(whole)]
    assert len(parts) == 3
    assert all(sweep_budgets(part) == sweep_budgets(whole) for part in parts)
    assert sorted(seed for part in parts for seed in sweep_seeds(part)) == sorted(sweep_seeds(whole))


def grid_loops(recipe: str) -> list[tuple[str, str]]:
    """(task, ranks) of each learning-rate grid loop a recipe runs."""
    return re.findall(r"for r in ([\d ]+); do grids=.*? task=(\w+)\)", recipe)


def test_the_rank_parts_of_each_learning_rate_grid_run_the_whole_grid_once():
    for column, task in (("instruct", "tulu"), ("math", "metamath"), ("biomed", "biomed")):
        whole = grid_loops(dry_run(f"table1-{column}-lr-grid"))
        assert whole == [("8 256", task)]
        parts = [loop for r in (8, 256) for loop in grid_loops(dry_run(f"table1-{column}-lr-grid-r{r}"))]
        assert parts == [("8", task), ("256", task)]


def run_lines(recipe: str) -> list[str]:
    """The experiments/run.py commands of a recipe, continuation lines joined, in order."""
    joined = recipe.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if "experiments/run.py" in line]


def makefile_default(name: str) -> str:
    (value,) = re.findall(rf"^{name}\s+\?= (.+)$", (REPO / "Makefile").read_text(), re.M)
    return value.strip()


def test_the_c4_diagnosis_parts_run_the_whole_diagnosis_once_each_writing_the_report():
    whole = dry_run("c4-diagnosis")
    rates, steps = dry_run("c4-diagnosis-rates"), dry_run("c4-diagnosis-steps")
    assert run_lines(rates) + run_lines(steps) == run_lines(whole)
    assert len(run_lines(rates)) == 3 and len(run_lines(steps)) == 1
    assert all("train.max_steps" not in line for line in run_lines(rates))  # the preset's length
    assert "train.max_steps=1600" in run_lines(steps)[0]
    for part in (rates, steps):
        assert part.rstrip().splitlines()[-1].endswith("analysis c4-diagnosis --runs results/c4_diagnosis "
                                                       "--out reports/c4_diagnosis")


def test_the_c4_calibration_parts_run_each_baseline_over_the_whole_ladder():
    ladder = makefile_default("CAL_C4_LR")
    lines = {m: run_lines(dry_run(f"calibrate-c4-{m}")) for m in ("fft", "lora")}
    for method, (line,) in lines.items():
        assert f"experiment=pretrain_c4 method={method} lr={ladder} seed=0" in line
    assert run_lines(dry_run("calibrate-c4")) == lines["fft"] + lines["lora"]
    assert run_lines(dry_run("calibrate-c4-lora", "CAL_C4_LR=1e-3")) == [
        lines["lora"][0].replace(f"lr={ladder}", "lr=1e-3")]


def pairs_loops(recipe: str) -> list[str]:
    return re.findall(r"for n in ([\d ]+); do", recipe)


def test_the_wider_base_calibration_runs_one_part_per_number_of_pairs_in_the_rounds_order():
    order = makefile_default("CAL2_PAIRS").split()
    assert pairs_loops(dry_run("calibrate-uuid-base")) == order  # the parts, one N each, in Amendment 1's order
    for n in order:
        part = dry_run(f"calibrate-uuid-base-pairs{n}")
        assert pairs_loops(part) == [n]
        assert "model=stories_w128" in part and "out_root=results/calibrate_uuid_r3/pairs$n" in part
        assert "build_base.py --model stories_w128" in part  # the base first, as the whole target
    assert pairs_loops(dry_run("calibrate-uuid-base", "CAL2_PAIRS=20 40")) == ["20", "40"]
    assert pairs_loops(dry_run("calibrate-uuid-epochs")) == [" ".join(order)]  # round 2 stays one loop


def test_the_c4_grid_parts_run_each_arm_s_grid_once_and_the_whole_compares_every_arm():
    arms = ["fft", "lora", "mora", "relora", "remora"]
    parts = {m: run_lines(dry_run(f"c4-lr-grid-{m}")) for m in arms}
    for method, (line,) in parts.items():
        assert f"method={method} lr=$(.venv/bin/python experiments/lr_grid.py task=c4 method={method}) seed=0" in line
    whole = dry_run("c4-lr-grid")
    assert run_lines(whole) == [line for m in arms for (line,) in [parts[m]]]
    # each part compares its arm's choice here with the committed one, then the whole compares every arm at once
    compare = [line for line in whole.splitlines() if "analysis best-lr" in line]
    assert [re.findall(r"--method (\S+)", line) for line in compare] == [[m, m] for m in arms] + [[",".join(arms)] * 2]
    assert all("--runs results/runs" in line and "--runs tests/fixtures/measured" in line for line in compare)


def test_the_bench_parts_measure_every_cell_of_the_benchmark_once_each_into_its_own_result():
    runs = [line.split("bench_adapters.py", 1)[1] for line in dry_run("bench").splitlines()
            if "benchmarks/bench_adapters.py" in line]
    assert len(runs) == 6
    cells, outs = [], []
    for run in runs:
        settings = bench_adapters.resolve_settings(bench_adapters.build_parser().parse_args(shlex.split(run)))
        assert (settings["repeats"], settings["threads"]) == (3, 1)  # the defaults: comparable with the committed
        settings["device"] = "cpu"
        cells.append(report._cells({"kind": "adapters", "settings": settings}))
        outs.append(settings["out"])
    shapes = bench_adapters.LLAMA2_7B_SHAPES
    float32 = {("cpu", "float32", k, d, t, r) for k, d in shapes for t in (256, 2048) for r in (8, 256)}
    bfloat16 = {("cpu", "bfloat16", 4096, 4096, 256, r) for r in (8, 256)}
    assert set().union(*cells) == float32 | bfloat16
    assert sum(map(len, cells)) == len(float32 | bfloat16)  # no cell twice
    assert len(set(outs)) == 6
    for out in outs:  # each part snapshots its own result
        assert f"benchmarks/report.py {out}" in dry_run("bench")
