"""analysis/pairs_sweep.py on synthetic run folders (experiments.loop.records): grouping by number of
pairs, best learning rate per arm, the MoRA − LoRA gap paired by seed. Accuracies are test data."""

import math

import pytest

from analysis.pairs_sweep import load_sweep, paired_gap, sweep_markdown, write_sweep_report
from experiments.loop.records import RunRecord

STEPS = (100, 167, 233, 300)


def write_run(root, n_pairs, method, rank, lr, seed, accuracy, batch=None):
    targets = [] if method == "fft" else ["q_proj", "v_proj"]
    config = {"rank": rank, "seed": seed, "lr": lr, "scale": {"name": "mini"},
              "task": {"name": "uuid", "n_pairs": n_pairs},
              "train": {"batch_size": batch or n_pairs * 3 // 10, "eval_steps": list(STEPS)},
              "method": {"name": method, "target_modules": targets}, "resolved": {"lr": lr, "effective_rank": 1}}
    record = RunRecord.create(root / f"pairs{n_pairs}" / f"{method}-r{rank}-lr{lr}-s{seed}", config, resume=False)
    for step, acc in zip(STEPS, accuracy):
        record.log(step, loss=1.0 - acc / 200, **{"eval/char_accuracy": acc})
    record.write_summary({"status": "completed"})


@pytest.fixture
def root(tmp_path):
    for seed in (0, 1):
        for n_pairs, spare in ((20, 1.0), (80, 0.5)):
            write_run(tmp_path, n_pairs, "fft", None, 3e-3, seed, [60 * spare, 100 * spare, 100, 100])
            for rank in (8, 256):
                write_run(tmp_path, n_pairs, "lora", rank, 1e-2, seed, [20, 30 + seed, 40, 50 * spare])
                write_run(tmp_path, n_pairs, "mora", rank, 5e-3, seed, [25, 40 + 3 * seed, 60, 70 * spare])
                write_run(tmp_path, n_pairs, "mora", rank, 1.5e-2, seed, [10, 10, 10, 10])   # a worse rate
    return tmp_path


def test_points_by_pairs_with_the_best_rate_per_arm(root):
    points = load_sweep([root])
    assert [(p.n_pairs, p.batch_size) for p in points] == [(20, 6), (80, 24)]
    mora = points[0].group("mora", 8)
    assert mora.lr == 5e-3 and len(mora.runs) == 2 and points[0].eval_steps == STEPS


def test_gap_is_paired_by_seed(root):
    point = load_sweep([root])[0]
    gap = paired_gap(point.group("mora", 256), point.group("lora", 256), 167)
    # seed 0: 40 - 30 = 10; seed 1: 43 - 31 = 12
    assert gap.mean == pytest.approx(11) and gap.std == pytest.approx(math.sqrt(2)) and gap.n == 2


def test_report_names_paper_steps_and_writes_the_figure(root, tmp_path):
    text = sweep_markdown(load_sweep([root]))
    assert "| 20 | 6 | 167 (500) |" in text and "## Paper rank 256" in text
    paths = write_sweep_report([root], tmp_path / "out")
    assert [p.name for p in paths] == ["pairs_sweep.md", "pairs_sweep.png", "pairs_sweep.pdf"]


def test_mixed_batches_at_one_n_are_refused(root):
    write_run(root, 20, "lora", 8, 3e-2, 0, [1, 2, 3, 4], batch=5)
    with pytest.raises(ValueError, match="several batch sizes"):
        load_sweep([root])


def test_best_lr_prints_the_chosen_rate_of_one_arm(root, capsys):
    from analysis.__main__ import main

    assert main(["best-lr", "--runs", str(root), "--method", "mora", "--rank", "8", "--where", "task.n_pairs=20"]) == 0
    assert capsys.readouterr().out.strip() == "0.005"
    assert main(["best-lr", "--runs", str(root), "--method", "dora", "--rank", "8", "--where", "task.n_pairs=20"]) == 1


def test_readme_shows_what_the_saved_sweep_runs_give():
    """The README's pairs-sweep tables are the rendering of tests/fixtures/measured (Table 2's N) and
    tests/fixtures/pairs_sweep (the other N)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    text = sweep_markdown(load_sweep([repo / "tests" / "fixtures" / "measured", repo / "tests" / "fixtures" / "pairs_sweep"]))
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 * 4 * 4   # two ranks, four numbers of pairs, four evaluations
    readme = (repo / "README.md").read_text()
    assert all(row in readme for row in rows)
