"""The figures the README shows, drawn from one results root into ``docs/figures/`` (``make figures``).

``python -m analysis figures --runs tests/fixtures/measured --out docs/figures`` draws Fig. 2, Fig. 3,
Fig. 4, Fig. 5, the Table 1 bars, the UUID pairs sweep and the C4 tokens sweep (their runs beside the root, in
``pairs_sweep/`` and ``c4_tokens_sweep/``) with the report modules' own plotting functions, under the fixed
file names of :data:`README_FIGURES`, as PNG only (:func:`analysis.plotting.save_png`: fixed dpi, no
version stamp), so drawing unchanged runs again gives the same file. ``tests/test_figures.py`` redraws
them from ``tests/fixtures/measured/`` and fails when a committed one is stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from matplotlib.figure import Figure

from analysis.c4_tokens_sweep import load_budgets, plot_budgets, model_size
from analysis.finetune_tables import load_finetune_runs, plot_table1
from analysis.pairs_sweep import load_sweep, plot_sweep
from analysis.plotting import save_png
from analysis.pretrain_figures import load_pretrain_runs, plot_fig4, plot_fig5
from analysis.runs import load_runs
from analysis.uuid_figures import plot_fig2, plot_fig3

# Which runs a figure reads: one loader per experiment, each called once per rendering.
LOADERS: dict[str, Callable[[Path], Sequence]] = {
    "uuid": lambda root: load_runs(root, task="uuid"),
    "c4": load_pretrain_runs,
    "finetune": load_finetune_runs,
    # the pairs sweep's own runs sit beside the runs root (results/pairs_sweep beside results/runs,
    # tests/fixtures/pairs_sweep beside tests/fixtures/measured); the preset's N is Table 2's runs
    "uuid_pairs": lambda root: load_sweep([root, root.parent / "pairs_sweep"]),
    # likewise the C4 tokens sweep's (results/c4_tokens_sweep, tests/fixtures/c4_tokens_sweep); 1,000 steps is Table 3's
    "c4_tokens": lambda root: load_budgets([root, root.parent / "c4_tokens_sweep"]),
}


class ReadmeFigure(NamedTuple):
    experiment: str                       # a key of LOADERS
    plot: Callable[[Sequence], Figure]    # runs → figure (raises ValueError when they cannot draw it)


# File stem under docs/figures/ → how it is drawn; the README links each as docs/figures/<stem>.png.
README_FIGURES: dict[str, ReadmeFigure] = {
    "fig2_uuid_lora_ranks": ReadmeFigure("uuid", plot_fig2),
    "fig3_uuid_lora_vs_mora": ReadmeFigure("uuid", plot_fig3),
    "fig4_c4_loss": ReadmeFigure("c4", plot_fig4),
    "fig5_singular_values": ReadmeFigure("c4", plot_fig5),
    "table1_bars": ReadmeFigure("finetune", plot_table1),
    "uuid_pairs_sweep": ReadmeFigure("uuid_pairs", plot_sweep),
    "c4_tokens_sweep": ReadmeFigure("c4_tokens", lambda budgets: plot_budgets(budgets, model_size()[0])),
}


def write_readme_figures(root: str | Path, out_dir: str | Path) -> tuple[list[Path], list[str], int]:
    """Draw every figure of :data:`README_FIGURES` from the run folders under ``root`` into
    ``out_dir/<stem>.png``. Returns (paths written, reasons a figure was skipped, runs read): runs
    that cannot draw a figure skip it, with the reason, rather than failing the others."""
    runs: dict[str, Sequence] = {}  # experiment → its runs, loaded once
    written, skipped = [], []
    for stem, figure in README_FIGURES.items():
        try:
            if figure.experiment not in runs:
                runs[figure.experiment] = LOADERS[figure.experiment](Path(root))  # ValueError: e.g. two scales
            written.append(save_png(figure.plot(runs[figure.experiment]), Path(out_dir) / f"{stem}.png"))
        except ValueError as err:
            skipped.append(f"{stem}.png: {err}")
    return written, skipped, sum(map(len, runs.values()))
