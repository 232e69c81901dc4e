"""analysis/finetune_tables.py: fine-tuning run folders → Tables 1, 4, 6 (and 7), the learning-rate sweep
table and the CLI, on synthetic run folders written with experiments.loop.records. Scores here are test data,
not measured results."""

import pytest

from analysis.__main__ import main as cli_main
from analysis.finetune_tables import (PAPER_TABLE1, ArmKey, load_finetune_runs, lr_sweep_markdown, parse_scores,
                                      select_lr, present_metrics, table1_markdown, table4_markdown, table6_markdown,
                                      table7_markdown)
from experiments.loop.records import RunRecord

TARGETS = ["q_proj", "v_proj"]


def ft_config(task, method, rank, seed, lr, operator="share", effective_rank=4):
    return {"rank": rank, "seed": seed, "lr": None, "task": {"name": task}, "scale": {"name": "mini"},
            # the fine-tuning experiments set method.operator for every method; only MoRA uses it
            "method": {"name": method, "operator": operator, "target_modules": [] if method == "fft" else TARGETS},
            "resolved": {"lr": lr, "effective_rank": effective_rank,
                         "rank_mapping": f"paper rank {rank} on width 4096 -> rank {effective_rank} on width 64"}}


def write_run(root, task, method, rank, seed, lr, final, operator="share", status="completed"):
    name = f"{task}-{method}-{operator}-r{rank}-lr{lr}-s{seed}"
    record = RunRecord.create(root / name, ft_config(task, method, rank, seed, lr, operator), resume=False)
    record.log(1, loss=3.0)
    record.write_summary({"status": status, "final": {"loss": 2.0, **final}})


def math_scores(nll, em):
    return {"lm_eval_first50/gsm8k_local_answer_nll/nll_per_token": nll,
            "lm_eval_first50/gsm8k_local_answer_nll/n_samples": 50.0,
            "lm_eval_first50/gsm8k_local_metamath/exact_match": em}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        write_run(root, "metamath", "fft", 8, seed, 3e-3, math_scores(2.0 + 0.1 * seed, 0.0))
        write_run(root, "metamath", "lora", 8, seed, 1e-2, math_scores(2.6 + 0.1 * seed, 0.02), operator="rotate")
        # a second learning rate for LoRA r=8: worse, so 1e-2 must be chosen
        write_run(root, "metamath", "lora", 8, seed, 3e-3, math_scores(2.9, 0.04), operator="rotate")
        for op, nll in (("rotate", 2.5), ("truncate", 2.8)):
            write_run(root, "metamath", "mora", 8, seed, 1e-2, math_scores(nll + 0.1 * seed, 0.0), operator=op)
        write_run(root, "metamath", "mora", 256, seed, 1e-2, math_scores(2.4, 0.0), operator="share")
        write_run(root, "tulu", "lora", 256, seed, 1e-2, {"lm_eval/alpaca_local_nll/nll_per_token": 3.5 + seed})
        write_run(root, "biomed", "fft", 8, seed, 3e-3, {"lm_eval_first100/pubmedqa_local/acc": 0.5,
                                                           "lm_eval_first100/pubmed_abstracts_ppl/bits_per_byte": 3.0})
        write_run(root, "biomed", "mora", 8, seed, 1e-2, {"lm_eval_first100/pubmedqa_local/acc": 0.4 + 0.1 * seed,
                                                            "lm_eval_first100/pubmed_abstracts_ppl/bits_per_byte": 3.2},
                  operator="rotate")
    # a failed seed disqualifies its learning rate; a UUID run is not a fine-tuning run
    write_run(root, "metamath", "dora", 8, 0, 1e-2, {}, status="failed")
    write_run(root, "uuid", "lora", 8, 0, 1e-2, {})
    return root


@pytest.fixture(scope="module")
def runs(root):
    return load_finetune_runs(root)


def rows(text):
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_scores_are_read_from_either_limit_prefix():
    scores, limits = parse_scores({"lm_eval/mmlu/acc": 0.5, "lm_eval_first50/gsm8k_metamath/exact_match": 0.25,
                                   "eval/response_nll": 2.0, "loss": 1.0})
    assert scores == {("mmlu", "acc"): 0.5, ("gsm8k_metamath", "exact_match"): 0.25}
    assert limits == {"mmlu": None, "gsm8k_metamath": 50}


def test_loading_keeps_fine_tuning_tasks_and_moras_operator_only(runs):
    assert {r.task for r in runs} == {"metamath", "tulu", "biomed"}
    keys = {r.key for r in runs}
    assert ArmKey("lora", None, 8) in keys and ArmKey("fft", None, None) in keys
    assert {ArmKey("mora", "rotate", 8), ArmKey("mora", "truncate", 8), ArmKey("mora", "share", 256)} <= keys


def test_duplicate_seed_is_refused(root, tmp_path):
    for sub in ("a", "b"):
        write_run(tmp_path / sub, "metamath", "lora", 8, 0, 1e-2, math_scores(2.0, 0.0), operator="rotate")
    with pytest.raises(ValueError, match="several runs share"):
        load_finetune_runs(tmp_path)


def test_lr_selection_takes_the_best_primary_score_and_skips_failed_rates(runs):
    metamath = [r for r in runs if r.task == "metamath"]
    metrics = present_metrics("metamath", metamath)
    assert [m.lm_eval_task for m in metrics] == ["gsm8k_local_answer_nll", "gsm8k_local_metamath"]
    cell = select_lr([r for r in metamath if r.key == ArmKey("lora", None, 8)], metrics)
    assert cell.lr == 1e-2 and cell.lrs_tried == (3e-3, 1e-2) and len(cell.runs) == 2
    assert cell.stats[metrics[0]].mean == pytest.approx(2.65)
    assert cell.stats[metrics[1]].mean == pytest.approx(2.0)  # exact match shown in percent
    assert select_lr([r for r in metamath if r.key.method == "dora"], metrics) is None


def test_table1_puts_each_tasks_paper_columns_beside_ours(runs):
    text = table1_markdown(runs)
    assert "### metamath" in text and "### tulu" in text and "### biomed" in text
    math_rows = rows(text.split("### metamath")[1].split("###")[0])
    assert math_rows[0].startswith("| method | r | ours: GSM8K answer NLL") and "paper: GSM8K | paper: MATH |" in math_rows[0]
    fft = next(r for r in math_rows if r.startswith("| FFT |"))
    assert "2.050 ± 0.071 (2)" in fft and fft.endswith(" 66.6 | 20.1 |")
    lora = next(r for r in math_rows if r.startswith("| LoRA | 8 → 4 |"))
    assert "2.650 ± 0.071 (2)" in lora and lora.endswith(f" {PAPER_TABLE1['lora', 8][2]} | 15.1 |")
    # Table 1's MoRA r = 8 row is rotation (Eq. 9); truncation belongs to Table 4 only
    assert any(r.startswith("| MoRA (rotate) | 8 → 4 | 2.550") for r in math_rows)
    assert not any("truncate" in r for r in math_rows)
    assert "gsm8k_local_answer_nll` scored on its first 50" in text
    assert "Not run:" in text and "DoRA r8" in text
    tulu = rows(text.split("### tulu")[1].split("###")[0])
    assert tulu[-1].startswith("| LoRA | 256 → 4 | 4.000 ± 0.707 (2) |") and tulu[-1].endswith("| 49.7 | 50.8 |")


def test_table4_rows_are_the_four_operators_with_paper_numbers(runs):
    text = table4_markdown(runs)
    body = rows(text)[1:]
    assert [r.split(" | ")[0] for r in body] == ["| truncate", "| share", "| decouple", "| rotate"]
    truncate = body[0]
    assert "| Eq. 4 | 2.850 ± 0.071 (2) | 0.0 ± 0.0 (2) | — | — | 59.5 | 66.6 |" in truncate
    assert body[1].endswith("| 2.400 ± 0.000 (2) | 0.0 ± 0.0 (2) | 62.5 | 67.9 |")


def test_table6_and_missing_table7(runs):
    text = table6_markdown(runs)
    body = rows(text)
    assert "ours: held-out abstracts bits/byte ↓" in body[0] and "ours: PubMedQA-L % ↑" in body[0]
    assert body[1].startswith("| FFT | – | 3.000 ± 0.000 (2) | 50.0 ± 0.0 (2) | 74.1 |")
    assert body[2].startswith("| MoRA (rotate) | 8 → 4 | 3.200 ± 0.000 (2) | 45.0 ± 7.1 (2) | 73.3 |")
    with pytest.raises(ValueError, match="task=finance"):
        table7_markdown(runs)


def test_by_rank_table_puts_the_ranks_side_by_side_with_the_chosen_rate(runs):
    from analysis.finetune_tables import by_rank_markdown

    text = by_rank_markdown(runs, "metamath")
    assert text.splitlines()[0].startswith("| method | GSM8K answer NLL (nats/token) r = 8 | "
                                           "GSM8K answer NLL (nats/token) r = 256 |")
    assert "| LoRA | 2.650 ± 0.071 (2 seeds), lr " in text   # two seeds: the count is said, three are the norm
    assert next(r for r in rows(text) if r.startswith("| FFT ")).startswith("| FFT (full rank, no r) | 2.050 ± 0.071 ")
    with pytest.raises(ValueError, match="no completed finance run"):
        by_rank_markdown(runs, "finance")


def test_lr_sweep_marks_the_chosen_rate(runs):
    text = lr_sweep_markdown([r for r in runs if r.task == "metamath"])
    lora = next(r for r in rows(text) if r.startswith("| LoRA | 8 |"))
    assert lora == "| LoRA | 8 | 2.900 ± 0.000 (2) | **2.650 ± 0.071 (2)** |"
    assert next(r for r in rows(text) if r.startswith("| FFT |")) == "| FFT | – | **2.050 ± 0.071 (2)** | — |"


def test_cli_writes_the_supported_tables_and_fails_without_runs(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["finetune", "--runs", str(root), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["table1.md", "table1.pdf", "table1.png", "table1_by_rank.md",
                                                     "table4.md", "table6.md"]
    assert "table7.md: Table 7" in capsys.readouterr().err
    assert cli_main(["finetune", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert cli_main(["finetune", "--runs", str(root), "--out", str(tmp_path / "y"), "--where", "seed=7"]) == 1
    assert "no fine-tuning run folders" in capsys.readouterr().err
    assert cli_main(["finetune-lr", "--runs", str(root), "--out", str(tmp_path / "z")]) == 0
    assert "| LoRA | 8 | 2.900" in (tmp_path / "z" / "lr_sweep.md").read_text()


def test_report_draws_table1_as_png_and_pdf(runs, tmp_path):
    from analysis.finetune_tables import write_finetune_report

    written, skipped = write_finetune_report(runs, tmp_path)
    assert {p.name for p in written} == {"table1.md", "table1_by_rank.md", "table4.md", "table6.md", "table1.png",
                                         "table1.pdf"}
    assert all(p.stat().st_size > 1000 for p in written if p.suffix in (".png", ".pdf"))
    assert [s.split(":")[0] for s in skipped] == ["table7.md"]


def test_notebook_executes_on_the_runs(root):
    from pathlib import Path

    from tests.conftest import execute_notebook

    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "finetuning.ipynb"
    outputs = execute_notebook(notebook, root, timeout=180)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "## Table 1" in markdown and "## Table 4" in markdown and "## Table 6" in markdown
    assert "| truncate | Eq. 4 | 2.850 ± 0.071 (2)" in markdown
    text = "".join(o.get("text", "") for o in outputs)
    assert "table7_markdown: Table 7" in text
