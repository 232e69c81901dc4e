"""analysis/: loading run folders, learning-rate selection, aggregation over seeds, Fig. 2/3, Table 2,
the CLI and the notebook, on a saved fixture of real tiny runs (tests/fixtures/uuid_runs)."""

import json
import math
from pathlib import Path

import pytest

from analysis import (PAPER_TABLE2, GroupKey, Run, aggregate_curves, best_groups, load_runs, mean_std,
                      plot_fig2, plot_fig3, select_learning_rates, table2_markdown)
from analysis.__main__ import main as cli_main
from analysis.methods import METHODS, UNKNOWN_COLOR, method_label, method_order, method_style
from analysis.runs import format_stat
from tests.conftest import execute_notebook

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "uuid_runs"
NOTEBOOK = REPO / "notebooks" / "uuid_memorization.ipynb"


@pytest.fixture(scope="module")
def runs():
    return load_runs(FIXTURE, task="uuid")


def fake_run(lr, seed, accuracy, loss, status="completed", method="lora", rank=8):
    """A hand-made Run with one evaluated and one logged step."""
    return Run(dir=Path(f"/fake/{method}-{lr}-{seed}"), task="uuid", scale="mini", method=method, operator=None,
               rank=rank, effective_rank=rank, rank_mapping=None, lr=lr, seed=seed, status=status,
               loss={10: loss}, char_accuracy={10: accuracy}, exact_match={10: 0.0})


def final_accuracy_from_files(run_dir):
    """Final character accuracy read straight from metrics.jsonl, independently of analysis/."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [m["eval/char_accuracy"] for m in lines if "eval/char_accuracy" in m][-1]


# ---------------------------------------------------------------- loading


def test_fixture_loads_into_tidy_records(runs):
    assert len(runs) == 12
    keys = {run.key for run in runs}
    assert keys == {GroupKey("fft", None, None), GroupKey("lora", None, 8), GroupKey("lora", None, 256),
                    GroupKey("mora", "share", 8), GroupKey("mora", "share", 256)}
    lora8 = next(r for r in runs if r.key == GroupKey("lora", None, 8))
    assert lora8.effective_rank == 1 and "NOT REPRESENTABLE" in lora8.rank_mapping
    assert list(lora8.loss) == list(range(2, 21, 2))
    assert list(lora8.char_accuracy) == [5, 10, 15, 20]
    assert all(r.status == "completed" and r.seed in (0, 1) for r in runs)


def test_load_runs_filters_and_refuses_duplicates(runs, tmp_path):
    assert load_runs(FIXTURE, task="uuid", **{"method.name": "fft"}) == [r for r in runs if r.method == "fft"]
    assert load_runs(FIXTURE, task="other") == []
    for name in ("a", "b"):  # the same (method, rank, lr, seed) twice would count a seed twice
        source = FIXTURE / "uuid" / "mini" / "fft-lr0.003-s0"
        (tmp_path / name).mkdir()
        for file in source.iterdir():
            (tmp_path / name / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match="several runs share"):
        load_runs(tmp_path)


# ---------------------------------------------------------------- aggregation


def test_mean_std_by_hand():
    stat = mean_std([1.0, 2.0, 3.0, 4.0])
    assert stat.mean == 2.5 and stat.n == 4
    assert stat.std == pytest.approx(math.sqrt(((1.5**2 + 0.5**2) * 2) / 3))  # sample std, ddof=1
    one = mean_std([7.0])
    assert one.mean == 7.0 and one.n == 1 and math.isnan(one.std)
    assert mean_std([]).n == 0
    assert format_stat(stat) == "2.5 ± 1.3 (4)" and format_stat(one) == "7.0 (1)"


def test_aggregate_curves_aligns_by_step():
    curves = [{0: 1.0, 10: 3.0}, {0: 3.0, 10: 5.0, 20: 9.0}]
    agg = aggregate_curves(curves)
    assert list(agg) == [0, 10, 20]
    assert (agg[0].mean, agg[0].n) == (2.0, 2) and agg[0].std == pytest.approx(math.sqrt(2))
    assert (agg[10].mean, agg[10].n) == (4.0, 2)
    assert agg[20].mean == 9.0 and agg[20].n == 1 and math.isnan(agg[20].std)


def test_group_aggregates_the_chosen_lr_seeds(runs):
    group = best_groups(runs)[GroupKey("mora", "share", 256)]
    seeds = [r for r in runs if r.key == group.key]
    assert group.seeds == (0, 1)
    assert group.loss[20].mean == pytest.approx(sum(r.loss[20] for r in seeds) / 2)
    assert group.char_accuracy[20].n == 2


# ---------------------------------------------------------------- learning-rate selection


def test_best_lr_on_fixture_is_the_best_mean_final_accuracy(runs):
    selection = next(s for s in select_learning_rates(runs) if s.key == GroupKey("lora", None, 8))
    assert [c.lr for c in selection.candidates] == [0.001, 0.01]
    by_lr = {c.lr: sum(final_accuracy_from_files(r.dir) for r in c.runs) / len(c.runs)
             for c in selection.candidates}
    assert selection.chosen.lr == max(by_lr, key=by_lr.get)
    assert selection.chosen.final_char_accuracy.mean == pytest.approx(by_lr[selection.chosen.lr])
    assert best_groups(runs)[selection.key].lr == selection.chosen.lr


def test_selection_rule_on_hand_made_runs():
    runs = [fake_run(1e-3, 0, 50.0, 1.0), fake_run(1e-3, 1, 70.0, 1.0),  # mean 60
            fake_run(1e-2, 0, 90.0, 0.5), fake_run(1e-2, 1, 95.0, 0.5, status="diverged"),  # not eligible
            fake_run(1e-4, 0, 60.0, 0.9), fake_run(1e-4, 1, 60.0, 0.9)]  # ties at 60, lower loss wins
    (selection,) = select_learning_rates(runs)
    assert [c.lr for c in selection.candidates] == [1e-4, 1e-3, 1e-2]
    assert [c.eligible for c in selection.candidates] == [True, True, False]
    assert selection.chosen.lr == 1e-4
    exact_tie = [fake_run(lr, 0, 10.0, 1.0) for lr in (3e-4, 1e-4)]
    assert select_learning_rates(exact_tie)[0].chosen.lr == 1e-4  # then the smaller lr
    failed = [fake_run(1e-3, 0, 10.0, 1.0, status=None)]
    assert select_learning_rates(failed)[0].chosen is None and best_groups(failed) == {}


# ---------------------------------------------------------------- Table 2 and figures


def table_rows(text):
    """(method, rank) cells → the row's cells, for the data rows of the first Markdown table."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells] for cells in rows[1:]}


def test_table2_has_paper_numbers_ours_and_chosen_lr(runs):
    text = table2_markdown(runs)
    rows, groups = table_rows(text.split("### Learning-rate selection")[0]), best_groups(runs)
    names = {"fft": "FFT", "lora": "LoRA", "mora": "MoRA"}
    assert list(rows) == [("FFT", "–"), ("LoRA", "8 (mini 1)"), ("MoRA", "8 (mini 1)"),
                          ("LoRA", "256 (mini 4)"), ("MoRA", "256 (mini 4)")]  # the paper's row order
    for (method, rank), paper in PAPER_TABLE2.items():
        group = next(g for k, g in groups.items() if k.method == method and k.rank == rank)
        row = next(cells for (name, r), cells in rows.items() if name == names[method] and
                   r.split(" ")[0] == ("–" if rank is None else str(rank)))
        assert row[2] == f"{group.lr:g}"
        assert row[3:] == [f"{format_stat(group.char_accuracy[step])} [paper {value:g}]"
                           for step, value in zip((5, 10, 15, 20), paper)]
    assert "300 → 5, 500 → 10, 700 → 15, 900 → 20" in text
    assert "Rule:" in text and "**chosen**" in text and "| lora r8 | 0.001 |" in text


def test_table2_with_explicit_steps(runs):
    header = next(line for line in table2_markdown(runs, steps=[10, 20]).splitlines() if line.startswith("| Method"))
    assert "step 10 (paper 300)" in header and "step 20 (paper 500)" in header and "700" not in header


@pytest.mark.parametrize("plot", [plot_fig2, plot_fig3])
def test_plots_write_png_and_pdf(runs, tmp_path, plot):
    fig = plot(runs, tmp_path / "figure.png")
    png, pdf = tmp_path / "figure.png", tmp_path / "figure.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "LoRA r=8 (mini r=1), lr=0.01" in labels
    assert "2 seeds" in fig.axes[0].get_title() and "mini" in fig.axes[0].get_title()


def test_fig3_without_its_methods_raises(runs):
    with pytest.raises(ValueError, match="Fig. 3"):
        plot_fig3([r for r in runs if r.method == "fft"])


def test_fig3_draws_lora_dashed_and_mora_solid(runs):
    lines = plot_fig3(runs).axes[0].get_lines()
    styles = {line.get_label().split(" ")[0]: line.get_linestyle() for line in lines}
    assert styles == {"LoRA": "--", "MoRA": "-"}  # the paper's Fig. 3: LoRA dashed, MoRA solid


def test_a_method_without_a_row_renders_under_its_own_name():
    assert method_label(GroupKey("vera", "share", 8), with_operator=True) == "vera (share)"
    assert method_style("vera").color == UNKNOWN_COLOR
    assert all(method_order(m) < method_order("vera") for m in METHODS)


# ---------------------------------------------------------------- CLI and notebook


def test_cli_writes_report_and_fails_without_runs(tmp_path, capsys):
    assert cli_main(["uuid", "--runs", str(FIXTURE), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["fig2.pdf", "fig2.png", "fig3.pdf", "fig3.png", "table2.md"]
    assert cli_main(["uuid", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 1
    (tmp_path / "empty").mkdir()
    assert cli_main(["uuid", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 1
    assert "no UUID run folders found" in capsys.readouterr().err


def test_notebook_executes_on_the_fixture():
    outputs = execute_notebook(NOTEBOOK, FIXTURE, timeout=120)
    # Fig. 2, Fig. 3 and the pairs sweep: the sweep's fixture, tests/fixtures/pairs_sweep, sits beside FIXTURE
    # where the notebook looks for it (results/pairs_sweep beside results/runs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert any("as the number of pairs grows" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert any("[paper 42.5]" in o.get("data", {}).get("text/markdown", "") for o in outputs)
