"""analysis/snapshot.py: the run folders behind the README, copied without checkpoints and without the
calibration runs that share results/runs (a rate outside the preset's grid)."""

from analysis.snapshot import preset_grid, snapshot
from experiments.loop.records import RunRecord


def write_run(root, task, method, lr, status="completed"):
    config = {"seed": 0, "lr": lr, "scale": {"name": "mini"}, "task": {"name": task}, "method": {"name": method},
              "resolved": {"lr": lr}}
    record = RunRecord.create(root / task / f"{method}-{lr}", config, resume=False)
    record.log(1, loss=1.0)
    record.write_summary({"status": status})
    (root / task / f"{method}-{lr}" / "checkpoint.pt").write_bytes(b"large")


def test_grid_runs_are_copied_and_ladder_runs_left_out(tmp_path):
    fft_grid = preset_grid("c4", "mini", "fft")
    assert fft_grid and 5e-4 not in fft_grid        # the calibration ladder's lowest rate is outside the grid
    runs = tmp_path / "runs"
    for lr in sorted(fft_grid):
        write_run(runs, "c4", "fft", lr)
    write_run(runs, "c4", "fft", 5e-4)                           # a calibration run
    write_run(runs, "c4", "fft", max(fft_grid) * 2, status="diverged")
    write_run(runs, "tulu", "lora", 1e-3)                        # a preset without a grid keeps every run
    copied = snapshot(runs, tmp_path / "out", "mini")
    names = sorted(p.name for p in copied)
    assert names == sorted([f"fft-{lr}" for lr in fft_grid] + ["lora-0.001"])
    assert not any((p / "checkpoint.pt").exists() for p in copied)
