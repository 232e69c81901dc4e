"""The README's measured numbers come from the run folders saved in tests/fixtures/measured/ (``make
snapshot`` copies them from results/runs, checkpoints left out): every notebook re-renders its tables
and figures from that snapshot without training, and each number the README quotes must appear in
both the notebook's output and the README. A README edited by hand away from the data, or data re-run
without updating the README, fails here."""

import re
from pathlib import Path

import pytest

from tests.conftest import execute_notebook

REPO = Path(__file__).resolve().parent.parent
MEASURED = REPO / "tests" / "fixtures" / "measured"
README = (REPO / "README.md").read_text()

# notebook → [(text the notebook renders from the snapshot, the same number as the README quotes it)]
QUOTED = {
    "uuid_memorization": [
        # the pairs sweep (its runs in tests/fixtures/pairs_sweep, beside the snapshot)
        ('| 80 | 24 | 300 (900) | 100.0 ± 0.0 (3) | 32.9 ± 3.1 (3) | 99.5 ± 0.5 (3) | 66.6 ± 3.5 (3) | 3/3 |',
         '| 80 | 24 | 300 (900) | 100.0 ± 0.0 (3) | 32.9 ± 3.1 (3) | 99.5 ± 0.5 (3) | 66.6 ± 3.5 (3) | 3/3 |'),
        ('| FFT | – | 0.003 | 94.2 ± 4.1 (3) [paper 42.5] | 99.2 ± 0.7 (3) [paper 100] | 100.0 ± 0.0 (3) [paper 100] | 100.0 ± 0.0 (3)',
         '| FFT | – | 0.003 | 94.2 ± 4.1 | 99.2 ± 0.7 | 100.0 ± 0.0 | 100.0 ± 0.0 |'),
        ('| LoRA | 8 (mini 1) | 0.01 | 15.0 ± 2.2 (3) [paper 9.9] | 26.4 ± 5.5 (3) [paper 10] | 39.4 ± 8.5 (3) [paper 10.7] | 47.0 ± 14.7 (3)',
         '| LoRA | 8 (1) | 0.01 | 15.0 ± 2.2 | 26.4 ± 5.5 | 39.4 ± 8.5 | 47.0 ± 14.7 |'),
        ('| MoRA | 8 (mini 1) | 0.005 | 28.8 ± 2.8 (3) [paper 10.1] | 44.1 ± 0.3 (3) [paper 15.7] | 72.6 ± 5.7 (3) [paper 87.4] | 84.7 ± 10.0 (3)',
         '| MoRA | 8 (1) | 0.005 | 28.8 ± 2.8 | 44.1 ± 0.3 | 72.6 ± 5.7 | **84.7 ± 10.0** |'),
        ('| LoRA | 256 (mini 8) | 0.003 | 25.8 ± 2.7 (3) [paper 9.9] | 65.3 ± 2.5 (3) [paper 70.6] | 97.8 ± 1.0 (3) [paper 100] | 100.0 ± 0.1 (3)',
         '| LoRA | 256 (8) | 0.003 | 25.8 ± 2.7 | 65.3 ± 2.5 | 97.8 ± 1.0 | 100.0 ± 0.1 |'),
        ('| MoRA | 256 (mini 8) | 0.005 | 60.8 ± 0.5 (3) [paper 41.6] | 96.4 ± 2.4 (3) [paper 100] | 100.0 ± 0.0 (3) [paper 100] | 100.0 ± 0.0 (3)',
         '| MoRA | 256 (8) | 0.005 | **60.8 ± 0.5** | **96.4 ± 2.4** | **100.0 ± 0.0** | 100.0 ± 0.0 |'),
    ],
    "pretraining": [
        ("| LoRA | 128 (mini 11) | 0.008 (of 0.004, 0.008, 0.016) | 28.78 ± 0.45 (3) |", "| LoRA | 8e-3 (4e-3 … 1.6e-2) | 28.8 ± 0.5 |"),
        ("| MoRA | 128 (mini 11) | 0.002 (of 0.001, 0.002, 0.004, 0.008, 0.016) | 32.01 ± 1.09 (3) |",
         "| MoRA | 2e-3 (1e-3 … 1.6e-2) | 32.0 ± 1.1 |"),
        ("| ReLoRA | 128 (mini 11) | 0.008 (of 0.004, 0.008, 0.016) | 29.13 ± 0.74 (3) |",
         "| ReLoRA | 8e-3 (4e-3 … 1.6e-2) | 29.1 ± 0.7 |"),
        ("| ReMoRA | 128 (mini 11) | 0.002 (of 0.001, 0.002, 0.004, 0.008, 0.016) | 32.24 ± 1.64 (3) |",
         "| ReMoRA | 2e-3 (1e-3 … 1.6e-2) | 32.2 ± 1.6 |"),
        ("| FFT | – | 0.004 (of 0.002, 0.004, 0.008) | 25.80 ± 0.32 (3) |", "| FFT | 4e-3 (2e-3 … 8e-3) | **25.8 ± 0.3** |"),
        ("| MoRA | 128 (mini 11) | 29.4 ± 0.5 (3) | 28.9 ± 0.9 (3) | 25.9 ± 0.1 (3) | 26.8 ± 0.5 (3) | 44.1 ± 0.5 (3) | "
         "48.8 ± 0.5 (3) | 44.3 ± 0.8 (3) |", "| 29.4 | 28.9 | 25.9 | 26.8 | 44.1 | 48.8 | 44.3 |"),
        ("| ReMoRA | 128 (mini 11) | 38.8 ± 0.1 (3) | 37.2 ± 0.4 (3) | 31.5 ± 0.2 (3) | 33.3 ± 0.1 (3) | 60.6 ± 0.5 (3) | "
         "60.6 ± 0.1 (3) | 60.8 ± 0.4 (3) |", "| 38.8 | 37.2 | 31.5 | 33.3 | 60.6 | 60.6 | 60.8 |"),
        # the tokens sweep (its runs in tests/fixtures/c4_tokens_sweep, beside the snapshot)
        ("| 2,000 | 14.1 | 3.90 | 22.5 ± 0.2 (lr 0.004) | 25.7 ± 0.5 (lr 0.008) | 27.6 ± 0.7 (lr 0.002) | +1.9 ± 0.3 |",
         "| 2,000 | 14.1 | 3.90 | 22.5 ± 0.2 (lr 0.004) | 25.7 ± 0.5 (lr 0.008) | 27.6 ± 0.7 (lr 0.002) | +1.9 ± 0.3 |"),
    ],
}



FIRST_FINETUNE_MINI = "#### The first fine-tuning miniature"


def finetuning_section() -> str:
    """The calibrated fine-tuning results (the first miniature's table, kept below them, is checked apart)."""
    start = README.index("### Fine-tuning (Section 5.2")
    end = min(README.index("\n## ", start), README.index(FIRST_FINETUNE_MINI, start))
    return README[start:end]


def finetuning_quotes() -> list[tuple[str, str]]:
    """Every "mean ± std" the README's fine-tuning tables quote must be a cell of the rendered tables
    ("mean ± std (3)": three seeds)."""
    table_lines = [line for line in finetuning_section().splitlines() if line.startswith("| ")]
    stats = re.findall(r"\d+\.\d+ ± \d+\.\d+", "\n".join(table_lines))
    assert len(stats) >= 15, "the README's fine-tuning tables are missing"
    return [(f"{stat} (", stat) for stat in stats]   # "mean ± std (n)": n seeds as measured


QUOTED["finetuning"] = finetuning_quotes()


@pytest.mark.parametrize("task", ["metamath", "tulu", "biomed"])
def test_the_readme_finetuning_tables_are_what_the_saved_runs_give(task):
    """Each task's table in the README (method × metric × rank, chosen rate per cell) is, verbatim, what
    analysis.finetune_tables.by_rank_markdown renders from tests/fixtures/measured."""
    from analysis.finetune_tables import by_rank_markdown, load_finetune_runs

    rendered = by_rank_markdown(load_finetune_runs(MEASURED), task)
    assert rendered in finetuning_section(), f"the README's {task} table differs from the saved runs':\n{rendered}"


@pytest.mark.parametrize("notebook", sorted(QUOTED))
def test_notebook_rerenders_the_readme_numbers_from_the_saved_runs(notebook):
    outputs = execute_notebook(REPO / "notebooks" / f"{notebook}.ipynb", MEASURED, timeout=300)
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"
    rendered = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    for from_runs, in_readme in QUOTED[notebook]:
        assert from_runs in rendered, f"the saved runs no longer give: {from_runs}"
        assert in_readme in README, f"the README no longer quotes: {in_readme}"


def test_the_capacity_starved_table_is_what_its_runs_give():
    """The README keeps the first preset's Table 2 (128 pairs on width 64, one rate per method) as the
    capacity-starved row: its numbers must still be what tests/fixtures/uuid_capacity_starved gives."""
    from analysis.runs import load_runs
    from analysis.uuid_figures import table2_markdown

    rendered = table2_markdown(load_runs(REPO / "tests" / "fixtures" / "uuid_capacity_starved", task="uuid"))
    for row in ("| LoRA | 256 (mini 4) | 0.01 | 20.4 ± 0.2 (3) [paper 9.9] | 21.1 ± 1.1 (3) [paper 70.6] | 24.1 ± 0.8 (3) "
                "[paper 100] | 26.6 ± 1.1 (3)",
                "| MoRA | 256 (mini 4) | 0.01 | 19.3 ± 0.8 (3) [paper 41.6] | 23.3 ± 0.2 (3) [paper 100] | 28.9 ± 0.5 (3) "
                "[paper 100] | 34.2 ± 2.2 (3)"):
        assert row in rendered
    assert "| LoRA r = 256 (mini r = 4) | 20.4 ± 0.2 | 21.1 ± 1.1 | 24.1 ± 0.8 | 26.6 ± 1.1 |" in README
    assert "| MoRA r = 256 (mini r = 4) | 19.3 ± 0.8 | 23.3 ± 0.2 | 28.9 ± 0.5 | 34.2 ± 2.2 |" in README


def test_the_first_c4_miniature_table_is_what_its_runs_give():
    """The README keeps the first C4 miniature's Table 3 (llama_mini, vocabulary 2,048, 400 steps, one rate per
    method; replaced by Amendment 5) as the row that shows what an embedding-dominated miniature measures: its
    numbers must still be what tests/fixtures/c4_first_mini gives."""
    from analysis.pretrain_figures import load_pretrain_runs, table3_markdown

    rendered = table3_markdown(load_pretrain_runs(REPO / "tests" / "fixtures" / "c4_first_mini"))
    for method, lr, stat, quoted in (("LoRA", "0.003", "122.70 ± 10.43", "122.7 ± 10.4"),
                                     ("MoRA", "0.003", "167.28 ± 9.88", "167.3 ± 9.9"),
                                     ("ReLoRA", "0.001", "205.18 ± 3.13", "205.2 ± 3.1"),
                                     ("ReMoRA", "0.003", "161.18 ± 9.09", "161.2 ± 9.1"),
                                     ("FFT", "0.003", "143.95 ± 8.64", "143.9 ± 8.6")):
        assert f"| {method} | " in rendered and f"| {lr} | {stat} (3) |" in rendered
        assert f"| {method} (first miniature) | {quoted} |" in README


def test_the_first_finetune_miniature_table_is_what_its_runs_give():
    """The README keeps the first fine-tuning miniature (100 steps of 8 on every task, one rate per arm chosen on
    math; replaced by Amendment 6) as the row that shows what an out-of-regime miniature measures (Tülu at 10.5
    epochs ranks over-fitting): its numbers must still be what tests/fixtures/finetune_first_mini gives."""
    from analysis.finetune_tables import load_finetune_runs, table1_markdown

    rendered = table1_markdown(load_finetune_runs(REPO / "tests" / "fixtures" / "finetune_first_mini"))
    section = README[README.index(FIRST_FINETUNE_MINI):]
    rows = [line for line in section.splitlines()[:20] if line.startswith("| ") and "±" in line]
    assert len(rows) == 3, "the first miniature's table (one row per task) is missing"
    for row in rows:
        for stat in re.findall(r"\d+\.\d+ ± \d+\.\d+", row):
            assert f"{stat} (3)" in rendered, stat


def test_every_notebook_is_checked_against_the_snapshot():
    assert {p.stem for p in (REPO / "notebooks").glob("*.ipynb")} == set(QUOTED)


def test_the_claims_table_quotes_only_measured_numbers():
    """The opening claims table's fine-tuning numbers (three decimals) are the fine-tuning section's."""
    start = README.index("## The paper's claims")
    claims = README[start:README.index("\n## ", start)]
    section = finetuning_section()
    for number in re.findall(r"\b\d\.\d{3}\b", claims):
        assert number in section, f"claims table quotes {number}, which the fine-tuning results do not show"


def test_the_readme_table4_is_what_the_saved_runs_give():
    from analysis.finetune_tables import load_finetune_runs, table4_markdown

    rendered = table4_markdown(load_finetune_runs(MEASURED)).splitlines()
    rows = [line for line in rendered if line.startswith("|")]
    assert len(rows) == 6 and "\n".join(rows) in finetuning_section()


def test_every_saved_run_was_written_by_one_process():
    """Steps increase strictly in every saved metrics file: two processes writing one folder (before the
    writer lock, a make target started twice did) interleave their lines, and a resumed run truncates its
    metrics to the checkpoint it continued from."""
    import json

    interleaved = []
    for metrics in sorted((REPO / "tests" / "fixtures").rglob("metrics.jsonl")):
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
        if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
            interleaved.append(str(metrics.parent.relative_to(REPO)))
    assert not interleaved, f"steps repeat or go back in: {interleaved}"


@pytest.mark.parametrize("method", ["fft", "lora", "mora", "relora", "remora"])
def test_table3_reruns_the_committed_table_at_the_committed_grids_rates(method, capsys):
    """``make table3`` takes each arm's rate from the committed grid runs (C4_LR_FROM, by default this snapshot)
    by Table 3's rule and runs it at seeds 0, 1, 2: each chosen rate must be strictly inside its grid, and the
    snapshot must hold that rate's three seeds, so a clone's ``make table3`` reruns exactly the README's Table 3."""
    from analysis.__main__ import main
    from analysis.pretrain_figures import load_pretrain_runs

    rank = [] if method == "fft" else ["--rank", "128"]
    assert main(["best-lr", "--task", "c4", "--runs", str(MEASURED), "--method", method, *rank]) == 0
    chosen = float(capsys.readouterr().out)
    runs = [r for r in load_pretrain_runs(MEASURED) if r.run.method == method]
    grid = sorted({r.run.lr for r in runs})
    assert grid[0] < chosen < grid[-1], (method, chosen, grid)
    assert sorted(r.run.seed for r in runs if r.run.lr == chosen) == [0, 1, 2]


@pytest.mark.parametrize("task", ["tulu", "metamath", "biomed"])
@pytest.mark.parametrize("rank", [8, 256])
def test_table1_reruns_the_committed_table_at_the_committed_grids_rates(task, rank, capsys):
    """``make table1-<task>`` takes each arm's rate from the committed grid runs (FT_LR_FROM, by default this
    snapshot) by Table 1's rule, all arms of a rank in one ``best-lr`` call as the Makefile makes it, and runs it at
    seeds 0, 1, 2: each chosen rate must be one of the preset's grid, strictly inside it, and the snapshot must hold
    that rate's three seeds, so a clone's ``make table1-<task>`` reruns exactly the README's Table 1 column."""
    from analysis.__main__ import main
    from analysis.finetune_tables import load_finetune_runs
    from experiments.config_value import config_value
    from experiments.lr_grid import methods_by_grid

    overrides = [f"experiment=finetune_r{rank}", f"task={task}"]
    grids = {m: grid for grid, methods in methods_by_grid(overrides).items() for m in methods}
    operator = config_value("method.operator", overrides)
    methods = sorted(grids)
    assert main(["best-lr", "--task", task, "--runs", str(MEASURED), "--method", ",".join(methods),
                 "--rank", str(rank), "--where", f"method.operator={operator}"]) == 0
    chosen = dict(zip(methods, map(float, capsys.readouterr().out.split())))
    assert sorted(chosen) == methods
    runs = load_finetune_runs(MEASURED, **{"task.name": task, "scale.name": "mini"})
    for method, lr in chosen.items():
        grid = sorted(grids[method])
        assert lr in grid and grid[0] < lr < grid[-1], (task, rank, method, lr, grid)
        seeds = sorted(r.seed for r in runs if r.key.method == method and r.lr == lr and r.status == "completed"
                       and r.key.rank in (rank, None) and r.key.operator in (operator, None))
        assert seeds == [0, 1, 2], (task, rank, method, lr, seeds)
