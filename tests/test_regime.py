"""The regime tables (analysis/regime.py): the numbers are right on cases small enough to count by
hand, the parameter counts agree with real injection and with what the measured runs recorded, the
measured rows follow the run folders, and the README block and docs/regime.md are the freshly
generated tables."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from analysis import regime
from analysis.__main__ import main as analysis_main
from analysis.regime import (BEGIN, END, IN, OUT, UNJUDGED, UUID_BITS, Row, Verdict, block, epochs_at,
                             first_full_step, grid_verdict, lone_adapter_parameters, lr_row, merged, reach_verdict,
                             readme_block, report, trainable, with_block, within)
from experiments.tasks.uuid_memory import make_uuid_pairs
from mora.adapters import AdapterConfig, inject_adapters, trainable_parameter_count

MEASURED = regime.MEASURED
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tables():
    return regime.tables(MEASURED)


def tiny_llama() -> LlamaForCausalLM:
    """Vocabulary 16, width 8, MLP 12, one layer, untied: small enough to count by hand."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=False))


# ------------------------------------------------------------------ numbers by hand

def test_within_the_tolerance_and_out_by_a_factor():
    assert within(1 / 16, 4 / 64).status == IN
    assert within(30, 30 * 1.25).status == IN and within(30, 30 * 1.26).status == OUT
    eight = within(8 / 4096, 1 / 64)
    assert eight.status == OUT and eight.text == "out by ×8 (mini larger)"
    assert within(30, 18.75).text == "out by ×1.6 (mini smaller)"
    assert within(5523, 16.65).text == "out by ×332 (mini smaller)"


def test_a_uuid_value_holds_122_random_bits():
    """Counted, not assumed: the bits that never change over 200 of the task's own values are the 6
    a version-4 UUID fixes (a random bit stays put over 200 draws with probability 2^-199)."""
    values = [int(value.replace("-", ""), 16) for _, value in make_uuid_pairs(200, seed=0)]
    varying = 0
    for v in values:
        varying |= v ^ values[0]
    assert 128 - varying.bit_count() == 6 and UUID_BITS == 122


def test_adapter_parameters_on_one_linear_by_hand():
    # LoRA: A (r×k) + B (d×r) = (k + d)·r; MoRA: r̂² with r̂ = round(√((k + d)·r)) (Section 4)
    assert lone_adapter_parameters(10, 20, AdapterConfig(method="lora", rank=2)) == (10 + 20) * 2
    assert lone_adapter_parameters(10, 20, AdapterConfig(method="mora", rank=2)) == 8 ** 2     # √60 = 7.75


def test_trainable_parameters_of_a_tiny_llama_by_hand():
    model = tiny_llama()
    lora = AdapterConfig(method="lora", rank=1, trainable_modules=("embed_tokens", "norm", "lm_head"))
    counted = trainable(model, lora)
    # q, k, v, o: 4 × (8 + 8); gate, up: 2 × (8 + 12); down: 12 + 8 (rank 1)
    assert counted.adapters == 4 * 16 + 2 * 20 + 20
    assert counted.embeddings == 2 * 16 * 8                      # embed_tokens and lm_head, untied
    assert counted.rest == 3 * 8                                 # two RMSNorms in the layer, the final one
    assert counted.embedding_share == pytest.approx(256 / (124 + 256 + 24))
    fft = trainable(model, AdapterConfig(method="fft", target_modules=()))
    assert fft.total == sum(p.numel() for p in model.parameters()) and fft.adapters == 0
    assert fft.embeddings == 256


@pytest.mark.parametrize("method", ["fft", "lora", "mora", "relora", "remora"])
def test_trainable_equals_real_injection_on_a_model_and_on_its_meta_copy(method):
    model = tiny_llama()
    adapter = (AdapterConfig(method="fft", target_modules=()) if method == "fft" else
               AdapterConfig(method=method, rank=2, trainable_modules=("embed_tokens", "norm", "lm_head")))
    with torch.device("meta"):
        meta = LlamaForCausalLM(model.config)
    injected = inject_adapters(copy.deepcopy(model), adapter)
    assert trainable(model, adapter).total == trainable(meta, adapter).total == trainable_parameter_count(injected)


def test_epochs_at_a_step():
    paper = SimpleNamespace(train=SimpleNamespace(batch_size=1000, grad_accum=1), task=SimpleNamespace(n_pairs=10_000))
    mini = SimpleNamespace(train=SimpleNamespace(batch_size=32, grad_accum=1), task=SimpleNamespace(n_pairs=128))
    assert epochs_at(paper, 500) == 50 and epochs_at(mini, 75) == 18.75


def test_reaching_full_accuracy():
    paper = {300: 42.5, 500: 100.0, 700: 100.0, 900: 100.0}
    assert first_full_step(paper) == 500 and first_full_step({300: 99.9}) is None
    late = reach_verdict(paper, {75: 20.0, 150: 37.0, 225: 96.0, 300: 100.0})
    assert late.status == OUT and late.text == "out by ×1.8 (mini later)"         # 300/300 against 500/900
    assert reach_verdict(paper, {150: 100.0, 300: 100.0}).status == IN             # 1/2 against 5/9
    assert reach_verdict({900: 54.2}, {300: 23.1}) == Verdict(IN, "neither reaches 100%")
    assert reach_verdict(paper, {300: 26.6}).status == OUT
    assert reach_verdict(paper, None).status == UNJUDGED


def test_learning_rate_grid_is_counted_against_the_papers():
    paper = frozenset({1e-4, 2e-4, 3e-4})
    assert grid_verdict(paper, frozenset({1e-2})) == Verdict(OUT, "1 point against the paper's 3")
    assert grid_verdict(paper, frozenset({1e-3, 3e-3, 1e-2})).status == IN
    assert grid_verdict(None, frozenset({1e-2})).status == UNJUDGED


def test_the_mini_grid_is_the_presets_and_the_runs(tmp_path):
    paper, mini = regime.compose("task=uuid", "scale=paper"), regime.compose("task=uuid", "scale=mini")
    row = lr_row("x", paper, mini, "lora", "lr_grid_by_method", [SimpleNamespace(method="lora", lr=0.5)])
    assert "0.5" in row.mini and row.paper == "{1e-4, 2e-4, 3e-4}"


def test_rows_equal_across_tasks_are_merged():
    same, other = Row("r/d", "1", "2", Verdict(IN, "")), Row("r/d", "1", "3", Verdict(IN, ""))
    assert [r.axis for r in merged({"a": [same], "b": [same]})] == ["r/d (a, b)"]
    assert [r.axis for r in merged({"a": [same], "b": [other]})] == ["a: r/d", "b: r/d"]


# ------------------------------------------------------------------ the tables from presets, models and runs

def rows_of(tables, title_start: str) -> dict[str, Row]:
    table = next(t for t in tables if t.title.startswith(title_start))
    return {row.axis: row for row in table.rows}


def test_each_experiment_has_the_axes_of_issue_12(tables):
    uuid, c4, finetune = (rows_of(tables, t) for t in ("UUID", "C4", "Fine-tuning"))
    for axes, wanted in ((uuid, ("per memorised bit", "r/d", "r̂/d", "epochs over the pairs", "100% character",
                                 "learning rates")),
                         (c4, ("tokens per parameter", "non-embedding", "embeddings + lm_head", "r/d",
                               "merge_every", "learning rates")),
                         (finetune, ("optimizer steps", "epochs over the training set", "before training", "r/d"))):
        for word in wanted:
            assert any(word in axis for axis in axes), f"no axis with {word!r}"
    assert all(row.verdict.status in (IN, OUT, UNJUDGED) for t in tables for row in t.rows)


def test_parameter_counts_agree_with_what_the_measured_runs_recorded():
    counted = 0
    for task, run_of, keys in (("uuid", lambda m, r: regime.uuid_run("mini", m, r), regime.UUID_PRESET_KEYS),
                               ("c4", lambda m, r: regime.c4_run("mini", m), regime.C4_PRESET_KEYS)):
        cfg = regime.compose("task=uuid", "scale=mini") if task == "uuid" else \
            regime.compose("experiment=pretrain_c4", "scale=mini")
        for record in regime.preset_records(MEASURED, task, cfg, keys):
            method = record["config"]["method"]["name"]
            run = run_of(method, record["config"]["rank"])
            assert trainable(regime.base_model(run), run.adapter).total == record["summary"]["trainable_parameters"]
            counted += 1
    if not counted:
        pytest.skip("no measured run of the current mini presets")


def copy_runs(tmp_path: Path, task: str, names: list[str]) -> Path:
    for name in names:
        shutil.copytree(MEASURED / task / "mini" / name, tmp_path / task / "mini" / name)
    return tmp_path


def rewrite_metrics(run_dir: Path, edit) -> None:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in edit(lines)))


def test_measured_rows_follow_the_run_folders(tmp_path):
    names = sorted(p.name for p in (MEASURED / "uuid" / "mini").iterdir() if p.name.startswith("fft-"))
    root = copy_runs(tmp_path, "uuid", names)
    first_eval = regime.uuid_run("mini", "fft", None).train.eval_steps[1]

    def full_from_second_evaluation(lines):
        return [{**m, "eval/char_accuracy": 100.0} if m["step"] >= first_eval and "eval/char_accuracy" in m else m
                for m in lines]

    for name in names:
        rewrite_metrics(root / "uuid" / "mini" / name, full_from_second_evaluation)
    fft = next(row for row in regime.uuid_table(root).rows if row.axis.startswith("FFT: first evaluation"))
    assert fft.mini.startswith(f"step {first_eval} of ")
    lora = next(row for row in regime.uuid_table(root).rows if row.axis.startswith("LoRA r = 256: first"))
    assert lora.mini == "not measured" and lora.verdict.status == UNJUDGED


def test_a_step_zero_evaluation_is_what_the_base_can_do(tmp_path):
    root = copy_runs(tmp_path, "metamath", ["fft-lr0.003-s0"])
    rewrite_metrics(root / "metamath" / "mini" / "fft-lr0.003-s0",
                    lambda lines: [{"step": 0, "time": 0.0, "eval/response_nll": 5.5}, *(m for m in lines if m["step"])])
    cfg = regime.finetune_cfg("metamath", "mini")
    assert regime.base_row("metamath", cfg, root).mini == "eval/response_nll 5.5"
    # the calibrated presets evaluate at step 0 (train.eval_steps: [0, ...]): every measured run scored the base
    assert regime.base_row("metamath", cfg, MEASURED).mini.startswith("eval/response_nll 4.95")
    rewrite_metrics(root / "metamath" / "mini" / "fft-lr0.003-s0", lambda lines: [m for m in lines if m["step"]])
    regime.mini_records.cache_clear()
    assert regime.base_row("metamath", cfg, root).mini.startswith("not measured")


# ------------------------------------------------------------------ the generated copies and the CLI

def test_readme_block_is_the_generated_tables(tables):
    assert readme_block(regime.README.read_text()) == block(tables), \
        "README is stale: python -m analysis.regime --readme README.md"


def test_doc_is_the_generated_tables(tables):
    assert regime.DOC.read_text() == report(tables), "stale: python -m analysis.regime --write docs/regime.md"


def test_readme_section_follows_the_claims_and_a_rewrite_touches_only_the_block(tables):
    text = "# t\n\n## The paper's claims and what we measured\n\nclaims\n\n## Two commands\n\nmake\n"
    inserted = with_block(text, block(tables))
    claims, section, commands = (inserted.index(h) for h in
                                 ("## The paper's claims", regime.README_HEADING, "## Two commands"))
    assert claims < section < commands and inserted.count(BEGIN) == inserted.count(END) == 1
    stale = inserted.replace("✓", "✗", 1)
    assert with_block(stale, block(tables)) == inserted
    assert regime.problems(tables, readme=regime.README, doc=regime.DOC) == []


def test_cli_writes_regime_md(tmp_path, capsys):
    out = tmp_path / "reports"
    assert analysis_main(["regime", "--runs", str(MEASURED), "--out", str(out)]) == 0
    text = (out / "regime.md").read_text()
    assert text.startswith("# Is each miniature in the paper's regime?") and "| axis | paper | mini |" in text
    assert analysis_main(["regime", "--runs", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "no runs" in capsys.readouterr().err
