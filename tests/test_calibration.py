"""analysis/calibration.py: the UUID calibration rule of docs/calibration.md on synthetic run folders
written with experiments.loop.records. Accuracies here are test data, not measured results."""

from pathlib import Path

import pytest

from analysis.__main__ import main as cli_main
from analysis.calibration import ARMS, calibration_markdown, load_calibration, selected_pairs
from experiments.loop.records import RunRecord

REPO = Path(__file__).resolve().parents[1]
STEPS = (75, 150, 225, 300)


def write_run(root, n_pairs, method, rank, lr, accuracy, loss=1.0, status="completed", eval_steps=None):
    """One run folder: ``accuracy`` is the character accuracy (%) at each of ``eval_steps`` (default STEPS,
    then left out of the config, as in runs that predate the key)."""
    targets = [] if method == "fft" else ["q_proj", "v_proj"]
    train = {"batch_size": n_pairs // 4} if eval_steps is None else {"batch_size": n_pairs // 4,
                                                                     "eval_steps": list(eval_steps)}
    config = {"rank": rank, "seed": 0, "lr": lr, "scale": {"name": "mini"},
              "task": {"name": "uuid", "n_pairs": n_pairs}, "train": train,
              "method": {"name": method, "target_modules": targets}, "resolved": {"lr": lr, "effective_rank": 1}}
    record = RunRecord.create(root / f"pairs{n_pairs}" / f"{method}-r{rank}-lr{lr}", config, resume=False)
    for step, acc in zip(eval_steps or STEPS, accuracy):
        record.log(step, loss=loss, **{"eval/char_accuracy": acc})
    record.write_summary({"status": status})


def write_grid(root, n_pairs, fft, lora256, lora8, grids=((1e-3, 3e-3, 1e-2), (3e-3, 1e-2, 3e-2)), eval_steps=None):
    """Every arm over its grid; the middle rate gets the given curve, the ends a worse one."""
    for (method, rank, curve), grid in ((("fft", 8, fft), grids[0]), (("lora", 256, lora256), grids[1]),
                                        (("lora", 8, lora8), grids[1])):
        for lr in grid:
            write_run(root, n_pairs, method, rank, lr, curve if lr == grid[1] else [a / 2 for a in curve],
                      eval_steps=eval_steps)


PASS = dict(fft=[60, 100, 100, 100], lora256=[30, 80, 100, 100], lora8=[20, 40, 50, 60])


@pytest.fixture
def root(tmp_path):
    write_grid(tmp_path, 16, **PASS)
    write_grid(tmp_path, 32, fft=[50, 100, 100, 100], lora256=[20, 60, 95, 100], lora8=[10, 30, 40, 50])  # LoRA late
    write_grid(tmp_path, 64, fft=[40, 90, 100, 100], lora256=[10, 30, 50, 60], lora8=[5, 20, 30, 40])
    return tmp_path


def test_rule_per_arm_and_selection(root):
    results = load_calibration(root)
    assert [r.n_pairs for r in results] == [16, 32, 64]
    assert all(r.complete and r.inside_grids for r in results)
    by = {(r.n_pairs, a.arm.label): a for r in results for a in r.arms}
    assert by[16, "FFT"].best_lr == 3e-3 and by[16, "LoRA r = 256"].best_lr == 1e-2
    assert by[16, "FFT"].first_full_step == 150 and by[16, "FFT"].paper_step(150) == 500
    assert by[32, "LoRA r = 256"].first_full_step == 300 and not by[32, "LoRA r = 256"].holds
    assert by[64, "FFT"].first_full_step == 225 and not by[64, "FFT"].holds
    assert [r.shape_holds for r in results] == [True, False, False]
    assert selected_pairs(results) == 16


def test_largest_passing_pairs_wins_and_lora8_at_100_fails(tmp_path):
    write_grid(tmp_path, 16, **PASS)
    write_grid(tmp_path, 32, **PASS)
    assert selected_pairs(load_calibration(tmp_path)) == 32
    write_grid(tmp_path, 64, **{**PASS, "lora8": [50, 90, 100, 100]})  # LoRA r=8 memorises: not the paper's shape
    assert selected_pairs(load_calibration(tmp_path)) == 32


def test_optimum_at_an_end_of_the_grid_is_flagged(tmp_path):
    write_grid(tmp_path, 16, **PASS)
    write_run(tmp_path, 16, "fft", 8, 3e-2, [100, 100, 100, 100], loss=0.1)  # a larger rate is better still
    (result,) = load_calibration(tmp_path)
    fft = next(a for a in result.arms if a.arm == ARMS[0])
    assert fft.best_lr == 3e-2 and not fft.inside_grid and not result.inside_grids


def test_mora_and_missing_arms_are_not_read(tmp_path):
    write_run(tmp_path, 16, "mora", 256, 1e-2, [100, 100, 100, 100])
    write_run(tmp_path, 16, "fft", 8, 3e-3, PASS["fft"])
    (result,) = load_calibration(tmp_path)
    assert [a.arm.method for a in result.arms] == ["fft"]
    assert not result.complete and not result.shape_holds and selected_pairs([result]) is None


def test_cli_writes_report_and_fails_without_runs(root, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["calibrate-uuid", "--runs", str(root), "--out", str(out)]) == 0
    text = (out / "calibration_uuid.md").read_text()
    assert "**Selection: 16 pairs** (batch 4)" in text
    assert "| 32 | 8 | LoRA r = 256 | {0.003, 0.01, 0.03} | 0.01 | yes | 20.0 | 60.0 | 95.0 | 100.0 | 300 (paper 900) |" in text
    assert cli_main(["calibrate-uuid", "--runs", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "error" in capsys.readouterr().err


def test_docs_show_the_report_of_the_committed_calibration_runs():
    """docs/calibration.md carries the report rendered from tests/fixtures/calibration_uuid (the real runs)."""
    rendered = calibration_markdown(load_calibration(REPO / "tests" / "fixtures" / "calibration_uuid"))
    assert rendered in (REPO / "docs" / "calibration.md").read_text()


def test_configured_evaluation_steps_map_to_the_paper_by_position(tmp_path):
    """Amendment 1's evaluations (100/167/233/300) are read from the runs' configs, not assumed."""
    write_grid(tmp_path, 40, **PASS, eval_steps=(100, 167, 233, 300))
    (result,) = load_calibration(tmp_path)
    fft = next(a for a in result.arms if a.arm == ARMS[0])
    assert fft.eval_steps == (100, 167, 233, 300)
    assert fft.first_full_step == 167 and fft.paper_step(167) == 500 and result.shape_holds
    assert "acc. % @ 167 (paper 500) | acc. % @ 233 (paper 700)" in calibration_markdown([result])


def test_docs_show_the_report_of_the_round_2_calibration_runs():
    """docs/calibration.md (Amendment 1) carries the report rendered from tests/fixtures/calibration_uuid_r2."""
    rendered = calibration_markdown(load_calibration(REPO / "tests" / "fixtures" / "calibration_uuid_r2"))
    docs = (REPO / "docs" / "calibration.md").read_text()
    assert rendered in docs.split("Amendment 1 (written before round 2's runs)", 1)[1]


def test_docs_show_the_report_of_the_round_3_calibration_runs():
    """docs/calibration.md (round 3, on the wider base) carries the report rendered from tests/fixtures/calibration_uuid_r3."""
    rendered = calibration_markdown(load_calibration(REPO / "tests" / "fixtures" / "calibration_uuid_r3"))
    docs = (REPO / "docs" / "calibration.md").read_text()
    assert rendered in docs.split("## Round 3 (Amendment 2's base)", 1)[1]
