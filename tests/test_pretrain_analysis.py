"""analysis/pretrain_figures.py: C4 run folders → Fig. 4, Table 3, Fig. 5, the CLI and the notebook,
on synthetic run folders written with experiments.loop.records (2 methods × 2 seeds, plus runs to ignore)."""

import math
from pathlib import Path

import pytest
import torch

from analysis import (PAPER_ORDER, PAPER_TABLE3, PretrainKey, fig5_markdown, group_pretrain_runs,
                      load_pretrain_runs, plot_fig4, plot_fig5, spectrum_counts, table3_markdown)
from analysis.__main__ import main as cli_main
from analysis.pretrain_figures import moving_average
from analysis.runs import format_stat
from tests.conftest import execute_notebook
from experiments.loop.records import RunRecord
from experiments.evaluation.spectra import FIG5_MODULE_TYPES, save_spectra

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "pretraining.ipynb"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA, MORA = (PretrainKey("mini", "llama_mini", "lora", None, 128),
              PretrainKey("mini", "llama_mini", "mora", "share", 128))
# final validation perplexity per (method, seed): test data, not a measured result
PERPLEXITY = {("lora", 0): 41.0, ("lora", 1): 43.0, ("mora", 0): 30.0, ("mora", 1): 31.0}
SPECTRUM_LENGTH = 16


def c4_config(method, seed, lr=3e-3, task="c4", model="llama_mini"):
    adapter = method != "fft"
    return {"rank": 128, "seed": seed, "lr": None, "task": {"name": task, "seq_len": 128},
            "train": {"max_steps": 100, "batch_size": 4, "grad_accum": 1},
            "scale": {"name": "mini"},
            "method": {"name": method, **({"operator": "share"} if method.endswith("mora") else {}),
                       "target_modules": list(TARGETS) if adapter else []},
            "model": {"name": model, "hidden_size": 128, "num_layers": 2},
            "resolved": {"lr": lr, "effective_rank": 21,
                         "rank_mapping": "paper rank 128 on width 768 -> rank 21 on width 128"}}


def spectrum(n_above):
    """A made-up singular-value vector: ``n_above`` values of 1.0, the rest 0.05."""
    return torch.tensor([1.0] * n_above + [0.05] * (SPECTRUM_LENGTH - n_above))


def above(method, seed, layer):
    """Count of σ > 0.1 in the synthetic spectra: LoRA 2 everywhere; MoRA 4+seed (layer 0), 6+seed (layer 1)."""
    return 2 if method == "lora" else 4 + 2 * layer + seed


def write_run(root, method, seed, perplexity, status="completed", spectra=True, **config):
    run_dir = root / f"{method}-s{seed}-{config.get('lr', 3e-3)}"
    record = RunRecord.create(run_dir, c4_config(method, seed, **config), resume=False)
    for step in range(5, 101, 5):
        record.log(step, loss=8.0 - step / 50 + 0.1 * seed + (0.5 if method == "lora" else 0.0), lr=1e-3)
        if step in (50, 100):
            final = perplexity if step == 100 else perplexity + 10
            record.log(step, **{"eval/loss": math.log(final), "eval/perplexity": final, "eval/tokens": 4096})
    if spectra:
        save_spectra(run_dir, {f"model.layers.{layer}.{'mlp' if t in TARGETS[4:] else 'self_attn'}.{t}":
                               spectrum(above(method, seed, layer)) for layer in (0, 1) for t in TARGETS})
    record.write_summary({"status": status, "final": {"eval/perplexity": perplexity}})
    return run_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for (method, seed), perplexity in PERPLEXITY.items():
        write_run(root / "c4" / "mini", method, seed, perplexity)
    write_run(root / "c4" / "mini", "lora", 2, 99.0, status="failed", spectra=False)  # left out, noted
    write_run(root / "uuid", "lora", 0, 1.0, task="uuid")  # another task: ignored
    return root


@pytest.fixture(scope="module")
def runs(root):
    return load_pretrain_runs(root)


# ---------------------------------------------------------------- loading and grouping


def test_loads_only_c4_and_groups_completed_seeds(runs):
    assert len(runs) == 5 and {r.key for r in runs} == {LORA, MORA}
    groups = group_pretrain_runs(runs)
    assert list(groups) == [LORA, MORA]  # the paper's row order
    assert all(g.seeds == (0, 1) and g.lr == 3e-3 and g.effective_rank == 21 for g in groups.values())
    lora = groups[LORA]
    assert (lora.perplexity.mean, lora.perplexity.n) == (42.0, 2) and lora.perplexity.std == pytest.approx(math.sqrt(2))
    assert list(lora.loss) == list(range(5, 101, 5))
    assert lora.loss[50].mean == pytest.approx(8.0 - 1.0 + 0.05 + 0.5) and lora.loss[50].n == 2
    assert lora.model_label == "llama_mini (hidden 128, 2 layers)"


def test_repeated_seed_is_refused(tmp_path):
    write_run(tmp_path / "a", "lora", 0, 40.0)
    write_run(tmp_path / "b", "lora", 0, 40.0)
    with pytest.raises(ValueError, match="several runs share"):
        load_pretrain_runs(tmp_path)


def test_a_grid_at_seed_0_keeps_its_best_rate_with_every_seed_there(tmp_path, capsys):
    # the shape of make c4-lr-grid + make table3: the grid at seed 0, the chosen rate at seeds 1 and 2
    for lr, ppl in [(1e-3, 50.0), (2e-3, 40.0), (4e-3, 45.0)]:
        write_run(tmp_path, "lora", 0, ppl, lr=lr)
    for seed, ppl in [(1, 44.0), (2, 42.0)]:
        write_run(tmp_path, "lora", seed, ppl, lr=2e-3)
    write_run(tmp_path, "lora", 1, 10.0, lr=4e-3)    # a stray seed at another rate is not part of the score
    group = group_pretrain_runs(load_pretrain_runs(tmp_path))[LORA]
    assert group.lr == 2e-3 and group.seeds == (0, 1, 2) and group.perplexity.mean == pytest.approx(42.0)
    assert group.rates_tried == (1e-3, 2e-3, 4e-3)
    table = table3_markdown(load_pretrain_runs(tmp_path))
    assert "| 0.002 (of 0.001, 0.002, 0.004) | 42.00 ± 2.00 (3) |" in table
    assert "scored by the mean final validation perplexity of the seeds that ran at every rate" in table
    capsys.readouterr()
    assert cli_main(["best-lr", "--task", "c4", "--runs", str(tmp_path), "--method", "lora", "--rank", "128"]) == 0
    assert capsys.readouterr().out.strip() == "0.002"
    assert cli_main(["best-lr", "--task", "c4", "--runs", str(tmp_path), "--method", "mora", "--rank", "128"]) == 1


def test_a_rate_whose_grid_seed_failed_is_not_eligible(tmp_path):
    write_run(tmp_path, "lora", 0, 30.0, lr=1e-3, status="diverged")
    write_run(tmp_path, "lora", 0, 40.0, lr=2e-3)
    assert group_pretrain_runs(load_pretrain_runs(tmp_path))[LORA].lr == 2e-3
    only_failed = tmp_path / "failed"
    write_run(only_failed, "lora", 0, 30.0, lr=1e-3, status="diverged")
    write_run(only_failed, "lora", 1, 40.0, lr=2e-3)      # no seed ran at both rates
    with pytest.raises(ValueError, match="no learning rate"):
        group_pretrain_runs(load_pretrain_runs(only_failed))
    assert cli_main(["pretrain", "--runs", str(only_failed), "--out", str(tmp_path / "out")]) == 1


def test_moving_average_by_hand():
    assert moving_average({1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}, 2) == {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0}
    assert moving_average({1: 1.0, 2: 3.0}, 1) == {1: 1.0, 2: 3.0}


# ---------------------------------------------------------------- Table 3


def table_rows(text):
    """Method → cells of the data rows of the first Markdown table in ``text``."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def test_paper_order_is_the_same_in_both_columns():
    assert PAPER_ORDER == ("remora", "mora", "relora", "lora")
    assert PAPER_ORDER == tuple(sorted(PAPER_TABLE3, key=lambda m: PAPER_TABLE3[m][1]))


def test_table3_puts_paper_numbers_beside_ours(runs):
    text = table3_markdown(runs)
    rows = table_rows(text)
    ours = format_stat(group_pretrain_runs(runs)[LORA].perplexity, 2)
    assert rows["LoRA"] == ["LoRA", "128 (mini 21)", "0.003", ours, "33.40", "28.56"]
    assert rows["LoRA"][3] == "42.00 ± 1.41 (2)"
    assert rows["MoRA"] == ["MoRA", "128 (mini 21)", "0.003", "30.50 ± 0.71 (2)", "28.54", "25.25"]
    assert "| Method | Rank | lr | ours: perplexity mean ± std (n) | paper 250M | paper 1.3B |" in text
    assert "**mini scale** on **llama_mini (hidden 128, 2 layers)**" in text and "not the 250M" in text
    assert "at step 100 on 4,096 validation tokens" in text
    assert "Ranking, ours (lowest perplexity first): MoRA 30.50 < LoRA 42.00." in text
    assert "(among the methods present: MoRA < LoRA) holds in ours" in text
    assert "lora-s2-0.003 (failed)" in text  # the failed seed is named, not averaged
    assert "99" not in rows["LoRA"][3]


def test_table3_fft_has_no_paper_number_and_a_reversed_order_is_reported(tmp_path):
    write_run(tmp_path, "fft", 0, 20.0)
    write_run(tmp_path, "relora", 0, 30.0)
    write_run(tmp_path, "remora", 0, 31.0)
    text = table3_markdown(load_pretrain_runs(tmp_path))
    rows = table_rows(text)
    assert rows["FFT"][1:] == ["–", "0.003", "20.00 (1)", "—", "—"]
    assert rows["ReLoRA"][4:] == ["32.19", "27.80"] and rows["ReMoRA"][4:] == ["26.74", "23.34"]
    assert list(rows) == ["ReLoRA", "ReMoRA", "FFT"]
    assert "does NOT hold in ours: ours is ReLoRA < ReMoRA" in text
    assert "FFT 20.00 < ReLoRA 30.00 < ReMoRA 31.00" in text


# ---------------------------------------------------------------- Fig. 5


def test_spectrum_counts_average_layers_then_seeds(runs):
    results = {r.group.key: r for r in spectrum_counts(runs)}
    assert list(results[MORA].counts) == list(FIG5_MODULE_TYPES)  # q, k, v, o, up, down, gate
    lora, mora = results[LORA].counts["q_proj"], results[MORA].counts["up_proj"]
    assert (lora.mean, lora.std, lora.n) == (2.0, 0.0, 2)
    assert (mora.mean, mora.n) == (5.5, 2) and mora.std == pytest.approx(math.sqrt(0.5))  # seeds: 5 and 6
    assert results[MORA].full_rank["q_proj"] == SPECTRUM_LENGTH
    assert spectrum_counts(runs, threshold=0.01)[0].counts["q_proj"].mean == SPECTRUM_LENGTH


def test_fig5_markdown(runs):
    text = fig5_markdown(runs)
    assert "singular values > 0.1 in ΔW" in text
    assert "| Method | Rank | q | k | v | o | up | down | gate |" in text
    assert "| MoRA | 128 (mini 21) | " + " | ".join(["5.5 ± 0.7 (2)"] * 7) + " |" in text
    assert "| LoRA | 128 (mini 21) | " + " | ".join(["2.0 ± 0.0 (2)"] * 7) + " |" in text
    assert "| min(d, k) | | " + " | ".join(["16"] * 7) + " |" in text


# ---------------------------------------------------------------- figures


def assert_png_and_pdf(stem):
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000


def test_fig4_writes_png_and_pdf_and_states_smoothing(runs, tmp_path):
    fig = plot_fig4(runs, tmp_path / "fig4.png", smooth=3)
    assert_png_and_pdf(tmp_path / "fig4")
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["LoRA r=128 (mini r=21), lr=0.003", "MoRA r=128 (mini r=21), lr=0.003"]
    assert "llama_mini" in ax.get_title() and "mini scale" in ax.get_title()
    assert "2 seeds" in fig._suptitle.get_text() and "moving average over 3" in fig._suptitle.get_text()


def test_fig5_writes_png_and_pdf_with_threshold_on_the_axis(runs, tmp_path):
    fig = plot_fig5(runs, tmp_path / "fig5", threshold=0.2)
    assert_png_and_pdf(tmp_path / "fig5")
    (ax,) = fig.axes
    assert "> 0.2" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "k", "v", "o", "up", "down", "gate"]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["LoRA r=128 (mini 21)", "MoRA r=128 (mini 21)",
                                                                         "min(d, k)"]


def test_without_spectra_fig5_is_refused(tmp_path):
    write_run(tmp_path, "lora", 0, 40.0, spectra=False)
    with pytest.raises(ValueError, match="spectra"):
        plot_fig5(load_pretrain_runs(tmp_path))


# ---------------------------------------------------------------- CLI and notebook


def test_cli_writes_report_and_fails_without_c4_runs(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["pretrain", "--runs", str(root), "--out", str(out), "--threshold", "0.01"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fig4.pdf", "fig4.png", "fig5.md", "fig5.pdf", "fig5.png",
                                                     "table3.md"]
    assert "> 0.01" in (out / "fig5.md").read_text() and "16.0 ± 0.0 (2)" in (out / "fig5.md").read_text()
    assert "paper 250M" in (out / "table3.md").read_text()
    assert cli_main(["pretrain", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert cli_main(["pretrain", "--runs", str(root / "uuid"), "--out", str(tmp_path / "x")]) == 1
    assert "no C4 run folders (task.name=c4) found" in capsys.readouterr().err
    assert cli_main(["pretrain", "--runs", str(root), "--out", str(tmp_path / "y"), "--where", "seed=7"]) == 1
    assert not (tmp_path / "x").exists()


def test_notebook_executes_on_the_runs(root):
    outputs = execute_notebook(NOTEBOOK, root, timeout=180)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| LoRA | 128 (mini 21) | 0.003 | 42.00 ± 1.41 (2) | 33.40 | 28.56 |" in markdown
    assert "| MoRA | 128 (mini 21) | " + " | ".join(["5.5 ± 0.7 (2)"] * 7) + " |" in markdown


def test_lr_sweep_table_marks_the_best_rate_per_group(tmp_path):
    from analysis.__main__ import main as cli_main
    from analysis.pretrain_figures import lr_sweep_markdown

    for lr, ppl in ((1e-3, 50.0), (1e-2, 40.0)):
        write_run(tmp_path, "lora", 0, ppl, lr=lr)
    text = lr_sweep_markdown(tmp_path)
    assert "| lr 0.001 | lr 0.01 |" in text
    assert "50.0" in text and "**40.0" in text and "**50.0" not in text
    assert cli_main(["pretrain-lr", "--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "lr_sweep.md").read_text() == text
    assert cli_main(["pretrain-lr", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 1
