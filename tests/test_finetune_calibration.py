"""The fine-tuning calibration (docs/calibration.md, Amendment 6) and the pieces it added: the {1, 3} × 10^k
ladder and the grids the rule derives from FFT's and LoRA's optima, ``task.n_train`` (the paper's epochs on a
subset), a step-0 evaluation of the base, Table 1's selection rule (the grid's seeds choose, every seed at the
chosen rate reports) and ``lr_grid.py --by-grid``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.finetune_calibration import (CalibrationArm, derived_grids, ladder_grid, ladder_index, ladder_value,
                                           table5_ratio)
from analysis.finetune_tables import ArmKey, FinetuneRun, Metric, select_lr
from experiments.loop.records import read_run
from experiments.run import execute
from experiments.tasks.examples import encode_examples
from tests.test_configs import REPO, compose
from tests.test_run_smoke import TINY, interrupted_run, metric_rows

NLL = Metric("t", "nll_per_token", "NLL", higher_is_better=False)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ the ladder and the rule

@pytest.mark.parametrize("lr, grid", [(1e-3, (3e-4, 1e-3, 3e-3)), (3e-2, (1e-2, 3e-2, 1e-1)),
                                      (5e-2, (1e-2, 3e-2, 1e-1)),
                                      (8e-3, (3e-3, 1e-2, 3e-2)), (0.017, (3e-3, 1e-2, 3e-2)),
                                      (0.018, (1e-2, 3e-2, 1e-1))])
def test_ladder_grid_is_three_points_around_the_nearest_in_log(lr, grid):
    assert ladder_grid(lr) == pytest.approx(grid)


def test_ladder_index_and_value_invert_each_other():
    for index in range(-12, 2):
        assert ladder_index(ladder_value(index)) == index
    assert ladder_value(ladder_index(1e-2) + 1) == 3e-2 and ladder_value(ladder_index(3e-2) + 1) == 1e-1


def run(lr: float, score: float, *, seed: int = 0, method: str = "lora", rank: int | None = 8,
        status: str = "completed") -> FinetuneRun:
    return FinetuneRun(dir=Path("."), task="metamath", scale="mini", key=ArmKey(method, None, rank),
                       effective_rank=None, rank_mapping=None, lr=lr, seed=seed, status=status,
                       scores={("t", "nll_per_token"): score}, limits={})


def arm(task: str, method: str, rank: int | None, scores: dict[float, float]) -> CalibrationArm:
    runs = {lr: run(lr, s, method=method, rank=rank) for lr, s in scores.items()}
    return CalibrationArm(task, method, rank, NLL, runs, {})


def test_derived_grids_follow_lora_times_table5_ratio():
    arms = {("metamath", "fft", None): arm("metamath", "fft", None, {1e-3: 2.3, 3e-3: 2.2, 1e-2: 2.4}),
            ("metamath", "lora", 8): arm("metamath", "lora", 8, {1e-2: 2.9, 3e-2: 2.7, 1e-1: 2.8}),
            ("metamath", "lora", 256): arm("metamath", "lora", 256, {1e-2: 2.6, 3e-2: 2.5, 1e-1: 2.55})}
    grids = derived_grids(arms, "metamath")
    assert grids["r8"]["fft"] == pytest.approx([1e-3, 3e-3, 1e-2])
    for method in ("lora", "loraplus", "asylora", "relora", "dora"):
        assert grids["r8"][method] == pytest.approx([1e-2, 3e-2, 1e-1])
        assert grids["r256"][method] == pytest.approx([1e-2, 3e-2, 1e-1])
    assert grids["r8"]["mora"] == pytest.approx([1e-2, 3e-2, 1e-1])      # 3e-2 x 1.67 = 5e-2, nearest 3e-2
    assert grids["r256"]["mora"] == pytest.approx([3e-3, 1e-2, 3e-2])    # 3e-2 x 0.267 = 8e-3, nearest 1e-2
    assert "fft" not in grids["r256"]
    assert table5_ratio("biomed", 256, "mora") == pytest.approx(6e-5 / 3.5e-4)


def test_an_optimum_at_an_end_asks_for_the_ladder_to_grow_and_gives_no_grid():
    low = arm("tulu", "lora", 8, {1e-2: 2.0, 3e-2: 2.5, 1e-1: 3.0})
    high = arm("tulu", "fft", None, {1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0})
    assert low.extend_to == pytest.approx(3e-3) and high.extend_to == pytest.approx(3e-2)
    grids = derived_grids({("tulu", "lora", 8): low, ("tulu", "fft", None): high}, "tulu")
    assert grids == {"r8": {}, "r256": {}}


# ------------------------------------------------------------------ Table 1's selection rule

def test_the_grid_seed_chooses_and_every_seed_of_the_chosen_rate_reports():
    runs = [run(1e-2, 3.0), run(3e-2, 2.0), run(1e-1, 2.5),              # the grid at seed 0
            run(3e-2, 2.4, seed=1), run(3e-2, 2.2, seed=2)]             # the chosen rate's other seeds
    cell = select_lr(runs, [NLL])
    assert cell.lr == 3e-2 and [r.seed for r in cell.runs] == [0, 1, 2]
    assert cell.stats[NLL].mean == pytest.approx(2.2) and cell.stats[NLL].n == 3
    assert cell.lrs_tried == (1e-2, 3e-2, 1e-1)


def test_a_rate_whose_grid_seed_did_not_complete_is_not_chosen():
    runs = [run(1e-2, 3.0), run(3e-2, math.nan, status="diverged"), run(3e-2, 1.0, seed=1)]
    assert select_lr(runs, [NLL]).lr == 1e-2


# ------------------------------------------------------------------ task.n_train and the step-0 evaluation

class CharTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[3 + (ord(c) % 50) for c in t] for t in texts]}


def test_encode_limit_keeps_the_first_usable_examples():
    # the 2nd example's prompt fills max_len, so it has nothing to learn and does not count
    examples = [("ab", "cd"), ("x" * 20, "y"), ("ef", "gh"), ("ij", "kl")]
    data = encode_examples(examples, CharTokenizer(), max_len=8, limit=2)
    assert len(data) == 2 and data.n_dropped == 1


def built_task(*overrides: str):
    from analysis.regime import _llama2c, run_config
    from experiments.tasks import build_task
    run = run_config("experiment=finetune_r8", "method=lora", *overrides)
    return build_task(run.task, _llama2c(run.model, run.data_root)[1], batch_size=2, seed=0, data_root=run.data_root)


def test_n_train_sets_the_training_set_and_too_many_is_refused_naming_the_field():
    assert len(built_task("task=tulu", "task.n_train=40").data) == 40        # usable examples, not raw ones
    assert len(built_task("task=biomed", "task.n_train=30").blocks) == 30
    with pytest.raises(ValueError, match=r"task\.n_train=77 .* \(76\)"):
        built_task("task=tulu", "task.n_train=77")


def test_step_zero_evaluates_the_untrained_model_once_even_across_a_resume(tmp_path, monkeypatch):
    args = [*TINY, "train.eval_steps=[0,3]"]
    whole = tmp_path / "whole"
    assert execute(compose(*args, f"out_dir={whole}"))["status"] == "completed"
    rows = read_run(whole)["metrics"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) - {"step", "time"} == {k for k in rows[-1] if k.startswith("eval/")} and "loss" not in rows[0]

    killed = tmp_path / "killed"   # killed before its first checkpoint (step 3): resumes clean, step 0 kept once
    interrupted_run(monkeypatch, 2, *args, f"out_dir={killed}")
    assert execute(compose(*args, f"out_dir={killed}", "resume=true"))["status"] == "completed"
    assert metric_rows(killed) == metric_rows(whole)


def test_eval_steps_below_zero_are_refused():
    from experiments.schema import build_run_config
    with pytest.raises(ValueError, match=r"train\.eval_steps must lie in \[0,"):
        build_run_config(compose(*TINY, "train.eval_steps=[-1]"), cuda_available=False)


# ------------------------------------------------------------------ lr_grid.py --by-grid

def test_lr_grid_by_grid_groups_the_methods_of_each_grid():
    out = subprocess.run([sys.executable, "experiments/lr_grid.py", "--by-grid", "task=uuid"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    grids = dict(line.split(" ") for line in out)
    methods = [m for line in out for m in line.split(" ")[0].split(",")]
    assert len(methods) == len(set(methods)) and "mora" in methods and "fft" in methods
    for line in out:
        method = line.split(" ")[0].split(",")[0]
        single = subprocess.run([sys.executable, "experiments/lr_grid.py", "task=uuid", f"method={method}"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        assert grids[line.split(" ")[0]] == single


# ------------------------------------------------------------------ the committed calibration

CALIBRATION = REPO / "tests" / "fixtures" / "calibration_finetune"
TASKS = ("metamath", "tulu", "biomed")


def test_each_presets_grids_are_the_rule_applied_to_the_committed_calibration_runs():
    """conf/preset/<task>_mini.yaml's lr_grid is what the rule derives from tests/fixtures/calibration_finetune (the
    seed-0 FFT and LoRA runs of `make calibrate-finetune`): a grid edited by hand, or chosen another way, fails."""
    from analysis.finetune_calibration import load_calibration, preset_specs
    from experiments.schema import compose_config
    arms = load_calibration(CALIBRATION, TASKS, preset_specs(TASKS))
    for task in TASKS:
        assert all(a.extend_to is None for (t, _, _), a in arms.items() if t == task), f"{task}: ladder not done"
        preset = compose_config([f"task={task}"]).lr_grid
        derived = derived_grids(arms, task)
        for rank_key in ("r8", "r256"):
            assert set(preset[rank_key]) == set(derived[rank_key]), (task, rank_key)
            for method, grid in preset[rank_key].items():
                # the derived three, plus Table 1's extensions (Amendment 6, item 4): adjacent ladder points only
                indices = [ladder_index(float(lr)) for lr in grid]
                assert indices == list(range(indices[0], indices[0] + len(indices))), (task, rank_key, method, grid)
                assert all(any(math.isclose(d, float(lr)) for lr in grid) for d in derived[rank_key][method]), \
                    (task, rank_key, method)
                assert len(grid) <= 4, (task, rank_key, method)   # one extension at most


def test_docs_show_the_report_of_the_committed_calibration_runs(tmp_path):
    from analysis.finetune_calibration import write_calibration_report
    body = write_calibration_report(CALIBRATION, tmp_path).read_text().split("\n\n", 1)[1]
    assert body.strip() in (REPO / "docs" / "calibration.md").read_text()
