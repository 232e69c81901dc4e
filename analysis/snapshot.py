"""``python -m analysis.snapshot --runs results/runs --out tests/fixtures/measured --scale mini``.

Copies the run folders behind the README's measured numbers, without what is large and not read by
``analysis/`` (checkpoints, lm-eval's per-task detail), so the test suite can re-render every notebook
from the very runs the README reports and check its numbers (tests/test_measured_results.py). The
copy replaces ``--out`` wholesale, so a run deleted from ``--runs`` disappears from the snapshot too. A run
at a learning rate outside its preset's grid (``lr_grid_by_method`` of the current ``<task>_<scale>`` preset, or
``lr_grid.r<rank>`` for fine-tuning, where it has one for the run's method) is left out: such runs are calibration
runs that share ``results/runs`` with the tables (``make calibrate-c4``, ``make calibrate-finetune``) and are kept
in their own fixture, not behind the README's tables.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from functools import lru_cache
from pathlib import Path

from experiments.loop.records import find_runs

# what tables, figures and notebooks read (experiments/loop/records.py, experiments/evaluation/spectra.py)
KEPT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "environment.json", "spectra.safetensors")


@lru_cache(maxsize=None)
def preset_grid(task: str, scale: str, method: str, rank: int | None = None) -> frozenset[float] | None:
    """The learning rates the current ``<task>_<scale>`` preset sweeps for ``method`` (None: it has no grid): its
    ``lr_grid_by_method``, or for the fine-tuning presets, whose grids depend on the rank, ``lr_grid.r<rank>``."""
    from experiments.schema import compose_config
    cfg = compose_config([f"task={task}", f"scale={scale}"])
    grids = cfg.get("lr_grid_by_method") or {}
    by_rank = cfg.get("lr_grid") or {}
    if rank is not None and f"r{rank}" in by_rank:
        grids = by_rank[f"r{rank}"]
    return frozenset(float(lr) for lr in grids[method]) if method in grids else None


def in_preset_grid(record: dict) -> bool:
    config = record["config"]
    grid = preset_grid(config["task"]["name"], config["scale"]["name"], config["method"]["name"], config.get("rank"))
    lr = (config.get("resolved") or {}).get("lr", config.get("lr"))
    return grid is None or any(abs(float(lr) - g) <= 1e-9 * g for g in grid)


def snapshot(runs: Path, out: Path, scale: str) -> list[Path]:
    """Copy every completed run of ``scale`` under ``runs`` at a rate of its preset's grid into ``out`` (same
    relative paths, only :data:`KEPT_FILES`); returns the copied folders. ``out`` is emptied first."""
    records = [r for r in find_runs(runs, **{"scale.name": scale})
               if (r["summary"] or {}).get("status") == "completed" and in_preset_grid(r)]
    if not records:
        raise ValueError(f"no completed runs of scale {scale!r} under {runs}")
    readme = (out / "README.md").read_text() if (out / "README.md").exists() else None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if readme is not None:  # the snapshot's own description survives a refresh
        (out / "README.md").write_text(readme)
    copied = []
    for record in records:
        source = Path(record["dir"])
        target = out / source.relative_to(runs)
        target.mkdir(parents=True)
        for name in KEPT_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, target / name)
        copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.snapshot", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/measured"),
                        help="snapshot folder, replaced (default: %(default)s)")
    parser.add_argument("--scale", default="mini", help="which scale's runs (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        copied = snapshot(args.runs.resolve(), args.out, args.scale)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for d in copied for f in d.iterdir())
    print(f"copied {len(copied)} run folders ({size / 1e6:.2f} MB) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
