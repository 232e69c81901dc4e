"""analysis/c4_tokens_sweep.py on synthetic C4 run folders: grouping by step budget, Table 3's rate rule within
a budget, gaps paired by seed, the over-fitting check, and the report files. Perplexities are test data."""

import math

import pytest

from analysis.c4_tokens_sweep import generalisation_gap, load_budgets, paired_gap, sweep_markdown, write_sweep_report
from experiments.loop.records import RunRecord

PARAMETERS, EPOCH_TOKENS = 2048 * 10, 2048 * 100   # a model size and corpus for the test, not the preset's


def write_run(root, steps, method, lr, seed, ppl, train_loss, model="llama_w64", batch=16):
    config = {"rank": None if method == "fft" else 128, "seed": seed, "lr": lr, "scale": {"name": "mini"},
              "model": {"name": model, "hidden_size": 64},
              "task": {"name": "c4", "seq_len": 128, "vocab_size": 512},
              "train": {"batch_size": batch, "grad_accum": 1, "max_steps": steps},
              "method": {"name": method, "target_modules": [] if method == "fft" else ["q_proj"]},
              "resolved": {"lr": lr, "effective_rank": None if method == "fft" else 11}}
    record = RunRecord.create(root / f"steps{steps}" / f"{method}-{lr}-s{seed}", config, resume=False)
    record.log(steps // 2, loss=train_loss + 1, **{"eval/perplexity": ppl * 2, "eval/loss": math.log(ppl * 2)})
    record.log(steps, loss=train_loss, **{"eval/perplexity": ppl, "eval/loss": math.log(ppl)})
    record.write_summary({"status": "completed"})


@pytest.fixture
def root(tmp_path):
    for steps, scale in ((100, 2.0), (400, 1.0)):
        for seed in (0, 1):
            write_run(tmp_path, steps, "fft", 4e-3, seed, 20 * scale + seed, math.log(20 * scale + seed) - 0.05)
            write_run(tmp_path, steps, "lora", 8e-3, seed, 25 * scale + seed, 3.0)
            write_run(tmp_path, steps, "mora", 2e-3, seed, 30 * scale + 2 * seed, 3.0)
        write_run(tmp_path, steps, "mora", 4e-3, 0, 90.0, 3.0)          # a worse rate at seed 0: not chosen
        write_run(tmp_path, steps, "relora", 8e-3, 0, 10.0, 3.0)        # not an arm of the sweep
    return tmp_path


def test_budgets_by_steps_with_table3s_rate_per_arm(root):
    budgets = load_budgets([root])
    assert [(b.steps, b.tokens) for b in budgets] == [(100, 100 * 16 * 128), (400, 400 * 16 * 128)]
    assert sorted(budgets[0].groups) == ["fft", "lora", "mora"]
    mora = budgets[0].groups["mora"]
    assert mora.lr == 2e-3 and mora.seeds == (0, 1) and mora.perplexity.mean == pytest.approx(61)


def test_gaps_are_paired_by_seed_and_the_overfitting_check_reads_fft(root):
    budget = load_budgets([root])[1]
    gap = paired_gap(budget.groups["mora"], budget.groups["lora"])
    # seed 0: 30 - 25 = 5; seed 1: 32 - 26 = 6
    assert gap.mean == pytest.approx(5.5) and gap.std == pytest.approx(math.sqrt(0.5)) and gap.n == 2
    assert generalisation_gap(budget.groups["fft"]).mean == pytest.approx(0.05)


def test_table_rows_and_report_files(root, tmp_path):
    text = sweep_markdown(load_budgets([root]), PARAMETERS, EPOCH_TOKENS)
    # 400 steps x 2,048 tokens / 20,480 parameters = 40 tokens per parameter, / 204,800 = 4 epochs
    assert "| 400 | 40.0 | 4.00 | 20.5 ± 0.7 (lr 0.004) | 25.5 ± 0.7 (lr 0.008) | 31.0 ± 1.4 (lr 0.002) | " \
           "+5.5 ± 0.7 | +10.5 ± 0.7 | +0.050 | 2/2/2 |" in text
    paths = write_sweep_report([root], tmp_path / "out")
    assert [p.name for p in paths] == ["c4_tokens_sweep.md", "c4_tokens_sweep.png", "c4_tokens_sweep.pdf"]


def test_two_models_or_token_counts_are_refused(root):
    write_run(root, 400, "lora", 1e-2, 0, 30.0, 3.0, model="llama_mini")
    with pytest.raises(ValueError, match="several models"):
        load_budgets([root])


def test_one_budget_with_two_batch_sizes_is_refused(tmp_path):
    write_run(tmp_path, 100, "lora", 8e-3, 0, 30.0, 3.0)
    write_run(tmp_path, 100, "mora", 8e-3, 0, 30.0, 3.0, batch=8)
    with pytest.raises(ValueError, match="several token counts"):
        load_budgets([tmp_path])


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no C4 runs"):
        sweep_markdown(load_budgets([tmp_path]), PARAMETERS, EPOCH_TOKENS)


def test_readme_shows_what_the_saved_sweep_runs_give():
    """The README's tokens-sweep table is the rendering of tests/fixtures/measured (Table 3's 1,000 steps) and
    tests/fixtures/c4_tokens_sweep (the other budgets), counted on the preset's model and corpus."""
    from pathlib import Path

    from analysis.c4_tokens_sweep import model_size

    repo = Path(__file__).resolve().parents[1]
    fixtures = repo / "tests" / "fixtures"
    text = sweep_markdown(load_budgets([fixtures / "measured", fixtures / "c4_tokens_sweep"]), *model_size())
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and all(row.endswith("| 3/3/3 |") for row in rows)
    readme = (repo / "README.md").read_text()
    assert all(row in readme for row in rows)
