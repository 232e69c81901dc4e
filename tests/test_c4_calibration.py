"""analysis/c4_calibration.py on synthetic C4 run folders: the rule of docs/calibration.md (Amendment 5)."""

import math
from pathlib import Path

import pytest

from analysis.c4_calibration import (calibration_markdown, choose, load_calibration, overfitting_verdict,
                                     write_calibration_report)
from experiments.loop.records import RunRecord

MODEL, STEPS = "llama_w64", 1000


def write_run(root, method, lr, ppl, train_loss, seed=0, model=MODEL, steps=STEPS, status="completed"):
    config = {"rank": 128, "seed": seed, "lr": lr, "scale": {"name": "mini"}, "model": {"name": model},
              "task": {"name": "c4", "seq_len": 128, "vocab_size": 512},
              "train": {"batch_size": 16, "grad_accum": 1, "max_steps": steps},
              "method": {"name": method, "target_modules": [] if method == "fft" else ["q_proj"]},
              "resolved": {"lr": lr, "effective_rank": 11}}
    record = RunRecord.create(root / f"{method}-{lr}-{seed}-{model}-{steps}-{status}", config, resume=False)
    for step, value in ppl.items():
        record.log(step, loss=train_loss, **{"eval/perplexity": value, "eval/loss": math.log(value)})
    final = math.log(ppl[max(ppl)])
    record.write_summary({"status": status, "final": {"loss": train_loss, "eval/loss": final}})


def curve(final):
    """A curve from a fresh model's loss ln(512) down to ``final`` perplexity, halving the rest each 250 steps."""
    start = math.log(512)
    return {s: math.exp(math.log(final) + (start - math.log(final)) * 0.5 ** (s / 250)) for s in (250, 500, 750)} | \
        {1000: final}


@pytest.fixture
def runs(tmp_path):
    for lr, final in [(5e-4, 90.0), (1e-3, 70.0), (2e-3, 60.0), (4e-3, 65.0)]:
        write_run(tmp_path, "fft", lr, curve(final), math.log(final) - 0.05)
    for lr, final in [(1e-3, 80.0), (2e-3, 75.0), (4e-3, 72.0)]:
        write_run(tmp_path, "lora", lr, curve(final), math.log(final) - 0.02)
    write_run(tmp_path, "mora", 2e-3, curve(10.0), 2.0)                     # never read by the rule
    write_run(tmp_path, "fft", 2e-3, curve(10.0), 2.0, seed=1)             # another seed
    write_run(tmp_path, "fft", 1e-3, curve(10.0), 2.0, model="llama_mini")  # the first miniature
    write_run(tmp_path, "lora", 2e-3, curve(10.0), 2.0, status="diverged")
    return load_calibration(tmp_path, MODEL, STEPS)


def test_only_seed0_baselines_of_the_preset_are_read(runs):
    assert [(r.method, r.lr) for r in runs] == [("fft", 5e-4), ("fft", 1e-3), ("fft", 2e-3), ("fft", 4e-3),
                                                ("lora", 1e-3), ("lora", 2e-3), ("lora", 4e-3)]


def test_optimum_inside_gives_a_centred_grid_and_at_an_end_asks_for_an_extension(runs):
    choices = choose(runs)
    assert choices["fft"].optimum.lr == 2e-3 and choices["fft"].extend_to is None
    assert choices["fft"].grid == (1e-3, 2e-3, 4e-3)
    assert choices["lora"].optimum.lr == 4e-3 and choices["lora"].extend_to == 8e-3
    text = calibration_markdown(runs)
    assert "Table 3 grid {0.001, 0.002, 0.004} for FFT" in text
    assert ("LoRA: optimum 0.004 is at an end of the rates run (0.001, 0.002, 0.004): extend the ladder to 0.008 "
            "(`make calibrate-c4-lora CAL_C4_LR=0.008`)") in text  # the part that runs only the arm to extend


def test_convergence_fraction_and_overfitting_check(runs, tmp_path):
    fft = choose(runs)["fft"].optimum
    # the curve has made 1 - 0.5**(s/250) of its decrease by step s (87.5% at 750): 95% first at the end
    assert fft.converged_fraction == 1.0 and fft.best_step == 1000
    assert "the step budget stays 1,000" in overfitting_verdict(fft)
    write_run(tmp_path / "over", "fft", 2e-3, {500: 50.0, 1000: 55.0}, math.log(55.0) - 0.3)
    over = load_calibration(tmp_path / "over", MODEL, STEPS)[0]
    assert over.best_step == 500 and over.converged_fraction == 0.5
    assert "cuts the step budget to 500" in overfitting_verdict(over)


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no completed seed-0 FFT or LoRA"):
        load_calibration(tmp_path, MODEL, STEPS)


def test_docs_show_the_report_of_the_committed_calibration_runs(tmp_path):
    """docs/calibration.md quotes `analysis c4-calibration` on tests/fixtures/calibration_c4 (the runs that
    chose Table 3's grids); a re-run or an edit by hand that changes a number fails here."""
    repo = Path(__file__).resolve().parents[1]
    rendered = write_calibration_report(repo / "tests" / "fixtures" / "calibration_c4", tmp_path).read_text()
    body = rendered.split("\n\n", 1)[1]   # past the title
    assert "Table 3 grid {0.002, 0.004, 0.008} for FFT" in body
    assert "Table 3 grid {0.004, 0.008, 0.016} for LoRA, MoRA, ReLoRA and ReMoRA" in body
    assert body.strip() in (repo / "docs" / "calibration.md").read_text()
