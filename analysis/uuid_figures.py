"""The UUID-memorisation results of the paper, redrawn from our run folders.

- Fig. 2 (Section 3): training loss of FFT and LoRA at every rank present;
- Fig. 3 (Section 5.1): training loss of LoRA and MoRA at ranks 8 and 256;
- Table 2 (Section 5.1): character accuracy at the evaluated steps, beside the paper's numbers.

Each line or row is one (method, operator, paper rank) at the learning rate chosen by
:data:`analysis.runs.SELECTION_RULE`, averaged over its seeds (mean line, ±1 sample-std band).
Figures are drawn with :mod:`analysis.plotting`, without pyplot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.methods import method_label, method_order, method_style, operators_vary
from analysis.plotting import draw_loss, line_label, line_style, new_figure, save_figure
from analysis.runs import (Group, GroupKey, Run, best_groups, common_eval_steps, format_stat, rank_label, seeds_text,
                           select_learning_rates, selection_markdown)

# The paper's published Table 2 (Jiang et al. 2024; LLaMA-2-7B, 10K UUID pairs, best lr of its grid):
# character accuracy (%) at training steps 300, 500, 700 and 900. These are the numbers we compare
# with, NOT our results. Keys are (method, paper rank); FFT has no rank. Row order is the paper's.
PAPER_TABLE2_STEPS = (300, 500, 700, 900)
PAPER_TABLE2: dict[tuple[str, int | None], tuple[float, float, float, float]] = {
    ("fft", None): (42.5, 100.0, 100.0, 100.0),
    ("lora", 8): (9.9, 10.0, 10.7, 54.2),
    ("mora", 8): (10.1, 15.7, 87.4, 100.0),
    ("lora", 256): (9.9, 70.6, 100.0, 100.0),
    ("mora", 256): (41.6, 100.0, 100.0, 100.0),
}

# The methods and ranks the paper's figures compare (Fig. 2: Section 3; Fig. 3: Section 5.1).
FIG2_METHODS = ("fft", "lora")
FIG3_METHODS, FIG3_RANKS = ("lora", "mora"), (8, 256)


# ---------------------------------------------------------------- figures


def _loss_figure(lines: list[tuple[Group, str, object, object]], title: str,
                 out_path: str | Path | None) -> Figure:
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for group, label, color, linestyle in lines:
        draw_loss(ax, group, label, color, linestyle)
    ax.set(xlabel="training step", ylabel="training loss (mean since previous log)", title=title)
    ax.title.set_fontsize(10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def _scale(groups: Sequence[Group]) -> str:
    return "/".join(sorted({g.runs[0].scale for g in groups}))


def plot_fig2(runs: Iterable[Run], out_path: str | Path | None = None) -> Figure:
    """Paper Fig. 2: training loss of FFT and of LoRA at every rank present, mean ± std over seeds.

    Saves ``<stem>.png`` and ``<stem>.pdf`` when ``out_path`` is given; returns the figure.
    Raises ValueError when there is no FFT or LoRA run to draw.
    """
    groups = [g for k, g in sorted(best_groups(runs).items(), key=lambda kv: _rank_order(kv[0]))
              if k.method in FIG2_METHODS]
    if not groups:
        raise ValueError("Fig. 2 needs FFT or LoRA runs; none found")
    ranked = [g.key for g in groups if g.key.rank is not None]
    viridis = colormaps["viridis"].resampled(max(2, len(ranked) + 1))  # one shade per rank, low rank dark
    color = {key: viridis(i) for i, key in enumerate(ranked)}
    with_op = operators_vary(groups)
    # a line without a rank (FFT) keeps its method's colour
    lines = [(g, line_label(g, with_op), color.get(g.key, method_style(g.key.method).color), "-") for g in groups]
    title = (f"Fig. 2 — UUID memorisation, FFT vs LoRA ({_scale(groups)} scale; "
             f"mean ± std over {seeds_text(groups)})")
    return _loss_figure(lines, title, out_path)


def _rank_order(key: GroupKey) -> tuple:
    return -1 if key.rank is None else key.rank, *method_order(key.method), key.operator or ""


def plot_fig3(runs: Iterable[Run], out_path: str | Path | None = None) -> Figure:
    """Paper Fig. 3: training loss of LoRA (dashed) and MoRA (solid) at ranks 8 and 256, mean ± std.

    One colour per rank; MoRA runs of several operators get further line styles. Saves
    ``<stem>.png`` and ``<stem>.pdf`` when ``out_path`` is given; returns the figure.
    Raises ValueError when there is no LoRA or MoRA run at those ranks.
    """
    groups = [g for k, g in sorted(best_groups(runs).items(), key=lambda kv: _rank_order(kv[0]))
              if k.method in FIG3_METHODS and k.rank in FIG3_RANKS]
    if not groups:
        raise ValueError(f"Fig. 3 needs LoRA or MoRA runs at ranks {FIG3_RANKS}; none found")
    keys, with_op = [g.key for g in groups], operators_vary(groups)
    # colour is the rank, so the line style tells the methods (and a method's operators) apart
    lines = [(g, line_label(g, with_op), f"C{FIG3_RANKS.index(g.key.rank)}",
              line_style(g.key, keys, method_style(g.key.method).linestyle)) for g in groups]
    title = (f"Fig. 3 — UUID memorisation, LoRA vs MoRA ({_scale(groups)} scale; "
             f"mean ± std over {seeds_text(groups)})")
    return _loss_figure(lines, title, out_path)


# ---------------------------------------------------------------- Table 2


def table2_groups(groups: dict[GroupKey, Group]) -> list[Group]:
    """The groups that are rows of Table 2, in the paper's row order (operators alphabetically)."""
    rows = []
    for method, rank in PAPER_TABLE2:
        matching = [g for k, g in groups.items() if k.method == method and k.rank == rank]
        rows += sorted(matching, key=lambda g: g.key.operator or "")
    return rows


def _cell(group: Group, step: int, paper: float | None) -> str:
    ours = format_stat(group.char_accuracy[step]) if step in group.char_accuracy else "—"
    return ours if paper is None else f"{ours} [paper {paper:g}]"


def _step_header(i: int, step: int) -> str:
    return f"step {step} (paper {PAPER_TABLE2_STEPS[i]})" if i < len(PAPER_TABLE2_STEPS) else f"step {step}"


def _table2_notes(rows: list[Group], steps: Sequence[int]) -> list[str]:
    pairs = list(zip(PAPER_TABLE2_STEPS, steps))
    mapped = ", ".join(f"{p} → {s}" for p, s in pairs)
    shorter = "" if all(p == s for p, s in pairs) else (
        "; our runs are shorter, so compare how accuracy rises, not step counts")
    notes = [
        "Character-level accuracy (%) of greedy generation of each pair's value. Each cell: ours as "
        "mean ± sample std over seeds (n seeds), then [paper x]: the paper's published Table 2 "
        "(LLaMA-2-7B, 10K pairs, 300–900 steps), shown for comparison; it is not our result.",
        f"Step mapping: the paper's steps map to our evaluated steps in order ({mapped}){shorter}.",
        "Rank: the paper's r (a LoRA parameter budget); in parentheses the rank used at this scale's width.",
        "lr: the learning rate chosen for the row by the rule below.",
    ]
    mappings = sorted({g.rank_mapping for g in rows if g.rank_mapping and "NOT REPRESENTABLE" in g.rank_mapping})
    notes += [f"Rank mapping: {m}." for m in mappings]
    return [f"- {n}" for n in notes]


def table2_markdown(runs: Iterable[Run], steps: Sequence[int] | None = None) -> str:
    """Paper Table 2 as Markdown: FFT, LoRA 8, MoRA 8, LoRA 256, MoRA 256 (the rows present), the
    chosen lr per row, ours "mean ± std (n)" at ``steps`` beside the paper's number, notes, and the
    learning-rate selection. ``steps``: our evaluated steps, matched in order to the paper's
    300/500/700/900 (default: the evaluated steps every row's runs share)."""
    runs = list(runs)
    groups = best_groups(runs)
    rows = table2_groups(groups)
    if not rows:
        raise ValueError("Table 2 needs FFT, LoRA or MoRA runs at ranks 8 or 256; none found")
    steps = tuple(steps) if steps is not None else common_eval_steps(rows)
    with_op = operators_vary(rows)
    header = ["Method", "Rank", "lr", *(_step_header(i, s) for i, s in enumerate(steps))]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for g in rows:
        paper = PAPER_TABLE2[(g.key.method, g.key.rank)]
        cells = [_cell(g, s, paper[i] if i < len(paper) else None) for i, s in enumerate(steps)]
        lines.append(f"| {method_label(g.key, with_op)} | {rank_label(g)} | {g.lr:g} | {' | '.join(cells)} |")
    scale = _scale(rows)
    return "\n".join([f"## Table 2 — UUID memorisation, character accuracy ({scale} scale, "
                      f"{seeds_text(rows)})", "", *lines, "", *_table2_notes(rows, steps), "",
                      "### Learning-rate selection", "", selection_markdown(select_learning_rates(runs))])


# ---------------------------------------------------------------- everything at once


def write_uuid_report(runs: Sequence[Run], out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Write fig2.{png,pdf}, fig3.{png,pdf} and table2.md into ``out_dir``.

    Returns (paths written, reasons for what was skipped): a figure or table with nothing to show
    is skipped with its reason rather than failing the others.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, plot in (("fig2", plot_fig2), ("fig3", plot_fig3)):
        try:
            written += save_figure(plot(runs), out_dir / name)
        except ValueError as err:
            skipped.append(f"{name}: {err}")
    try:
        (out_dir / "table2.md").write_text(table2_markdown(runs), encoding="utf-8")
        written.append(out_dir / "table2.md")
    except ValueError as err:
        skipped.append(f"table2: {err}")
    return written, skipped
