"""The pretraining results of the paper (Section 5.3, Section 6.1), redrawn from our C4 run folders.

- Fig. 4: training loss of each method, one panel per model (the paper: 250M and 1.3B);
- Table 3: C4 validation perplexity beside the paper's numbers, our ranking of the methods and
  whether the paper's ordering (ReMoRA < MoRA < ReLoRA < LoRA) holds in ours;
- Fig. 5: number of singular values > 0.1 of ΔW per module type (from ``spectra.safetensors``,
  written by ``experiments/evaluation/spectra.py``), also as a Markdown table.

Each line, row or bar is one (scale, model, method, operator, paper rank), mean ± sample std over
its seeds; only completed runs count (the others are listed in the notes). A group that ran several
learning rates (``make table3``: a grid at seed 0, the chosen rate at seeds 1 and 2) keeps one by
:data:`PRETRAIN_SELECTION_RULE`.
Figures are drawn with :mod:`analysis.plotting`, without pyplot.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.methods import method_label, method_order, method_style, operators_vary
from analysis.plotting import draw_loss, line_label, line_style, new_figure, save_figure
from analysis.runs import (Run, Stat, aggregate_curves, check_unique, format_stat, mean_std, metric_curve, rank_label,
                           run_from_record, seeds_text)
from experiments.loop.records import find_runs

TASK, PERPLEXITY, EVAL_TOKENS = "c4", "eval/perplexity", "eval/tokens"

PRETRAIN_SELECTION_RULE = (
    "For each (scale, model, method, operator, paper rank) group that ran several learning rates, each rate is "
    "scored by the mean final validation perplexity of the seeds that ran at every rate of the group (seed 0 "
    "under `make table3`, which runs each arm's grid at seed 0 and its chosen rate at seeds 1 and 2); the lowest "
    "wins, ties to the smaller rate; a rate with one of those seeds not completed is not eligible. The group "
    "reports every completed seed at the chosen rate (best-of-grid, as the paper reports its grids; the paper "
    "states no grid for Table 3, docs/calibration.md Amendment 5 gives this one).")

# The paper's published Table 3 (Jiang et al. 2024): C4 validation perplexity of LLaMA-style models
# pretrained from scratch (10K steps, batch 1024, 512 tokens, r = 128). These are the numbers we
# compare with, NOT our results. The paper has no FFT row. Row order is the paper's.
PAPER_TABLE3_MODELS = ("250M", "1.3B")
PAPER_TABLE3: dict[str, tuple[float, float]] = {
    "lora": (33.40, 28.56),
    "mora": (28.54, 25.25),
    "relora": (32.19, 27.80),
    "remora": (26.74, 23.34),
}
PAPER_RANK = 128
# The paper's ranking, lowest perplexity first (the same in both columns): ReMoRA < MoRA < ReLoRA < LoRA.
PAPER_ORDER = tuple(sorted(PAPER_TABLE3, key=lambda m: PAPER_TABLE3[m][0]))
FIG5_THRESHOLD = 0.1


class PretrainKey(NamedTuple):
    """What a table row, a loss line or a set of bars stands for; ``rank`` is None for FFT."""

    scale: str
    model: str
    method: str
    operator: str | None
    rank: int | None


@dataclass(frozen=True)
class PretrainRun:
    """One C4 run folder: the fields every analysis reads (:class:`analysis.runs.Run`) plus the
    model, the validation-perplexity curve (step → value) and its token count."""

    run: Run
    model: str
    model_label: str
    width: int  # the model's hidden size (0 if the config does not say): panels go from small to large
    perplexity: dict[int, float]
    eval_tokens: int | None

    @property
    def key(self) -> PretrainKey:
        return PretrainKey(self.run.scale, self.model, self.run.method, self.run.operator, self.run.rank)

    @property
    def dir(self) -> Path:
        return self.run.dir

    @property
    def scale(self) -> str:  # read by analysis.runs.rank_label and analysis.plotting.line_label
        return self.run.scale

    @property
    def final_perplexity(self) -> float:
        """Validation perplexity at the last evaluated step (NaN if never evaluated)."""
        return self.perplexity[max(self.perplexity)] if self.perplexity else math.nan


@dataclass(frozen=True)
class PretrainGroup:
    """The completed seeds of one :class:`PretrainKey`, aggregated: training loss per step and
    final validation perplexity (over the seeds that were evaluated)."""

    key: PretrainKey
    runs: tuple[PretrainRun, ...]
    loss: dict[int, Stat]
    perplexity: Stat
    rates_tried: tuple[float, ...] = ()   # every learning rate the group ran (the chosen one among them)

    @property
    def lr(self) -> float:
        return self.runs[0].run.lr

    @property
    def effective_rank(self) -> int | None:
        return self.runs[0].run.effective_rank

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(r.run.seed for r in self.runs))

    @property
    def model_label(self) -> str:
        return self.runs[0].model_label


# ---------------------------------------------------------------- loading and grouping


def _model_label(model: dict[str, Any]) -> str:
    """``llama_mini (hidden 128, 4 layers)`` from the resolved config's ``model`` section."""
    shape = [f"hidden {model['hidden_size']}"] if "hidden_size" in model else []
    shape += [f"{model['num_layers']} layers"] if "num_layers" in model else []
    return f"{model.get('name', '?')} ({', '.join(shape)})" if shape else str(model.get("name", "?"))


def pretrain_run_from_record(record: dict[str, Any]) -> PretrainRun:
    """A :class:`PretrainRun` from :func:`experiments.loop.records.read_run`'s dict."""
    model, metrics = record["config"].get("model", {}), record["metrics"]
    tokens = metric_curve(metrics, EVAL_TOKENS)
    return PretrainRun(run=run_from_record(record), model=str(model.get("name", "?")), model_label=_model_label(model),
                       width=int(model.get("hidden_size", 0)), perplexity=metric_curve(metrics, PERPLEXITY),
                       eval_tokens=int(tokens[max(tokens)]) if tokens else None)


def load_pretrain_runs(root: str | Path, **filters: Any) -> list[PretrainRun]:
    """Every C4 run under ``root`` (every scale and model), as :class:`PretrainRun`.

    ``filters`` are dotted config keys passed to :func:`find_runs`, e.g. ``**{"scale.name": "mini"}``.
    Raises ValueError if two folders hold the same (scale, model, method, operator, rank, seed).
    """
    runs = [pretrain_run_from_record(r) for r in find_runs(root, **{"task.name": TASK, **filters})]
    check_unique(runs, lambda r: (*r.key, r.run.lr, r.run.seed), "(scale, model, method, operator, rank, lr, seed)")
    return runs


def _row_order(key: PretrainKey) -> tuple:
    return *method_order(key.method), key.operator or "", -1 if key.rank is None else key.rank


def choose_pretrain_lr(runs: Sequence[PretrainRun]) -> float:
    """The learning rate :data:`PRETRAIN_SELECTION_RULE` keeps among one group's runs (all statuses).
    Raises ValueError when no rate is eligible."""
    by_lr: dict[float, dict[int, PretrainRun]] = defaultdict(dict)
    for run in runs:
        by_lr[run.run.lr][run.run.seed] = run
    if len(by_lr) == 1:
        return next(iter(by_lr))
    grid_seeds = set.intersection(*(set(seeds) for seeds in by_lr.values()))
    scores = {}
    for lr, seeds in by_lr.items():
        finals = [seeds[s].final_perplexity for s in grid_seeds
                  if seeds[s].run.status == "completed" and not math.isnan(seeds[s].final_perplexity)]
        if grid_seeds and len(finals) == len(grid_seeds):
            scores[lr] = sum(finals) / len(finals)
    if not scores:
        raise ValueError(f"{runs[0].key}: no learning rate of {sorted(by_lr)} has every seed run at all of them "
                         f"({sorted(grid_seeds) or 'none'}) completed with a perplexity")
    return min(scores, key=lambda lr: (scores[lr], lr))


def group_pretrain_runs(runs: Iterable[PretrainRun]) -> dict[PretrainKey, PretrainGroup]:
    """One :class:`PretrainGroup` per key from the completed runs at the key's chosen learning rate
    (:func:`choose_pretrain_lr`), in row order (scale, model from small to large, then the methods'
    order in :data:`analysis.methods.METHODS`)."""
    every: dict[PretrainKey, list[PretrainRun]] = defaultdict(list)
    for run in runs:
        every[run.key].append(run)
    chosen = {key: choose_pretrain_lr(rs) for key, rs in every.items()}
    by_key = {key: [r for r in rs if r.run.status == "completed" and r.run.lr == chosen[key]]
              for key, rs in every.items()}
    by_key = {key: rs for key, rs in by_key.items() if rs}
    groups = {}
    for key in sorted(by_key, key=lambda k: (k.scale, by_key[k][0].width, k.model, *_row_order(k))):
        members = tuple(sorted(by_key[key], key=lambda r: r.run.seed))
        finals = [r.final_perplexity for r in members if not math.isnan(r.final_perplexity)]
        groups[key] = PretrainGroup(key, members, aggregate_curves(r.run.loss for r in members), mean_std(finals),
                                    tuple(sorted({r.run.lr for r in every[key]})))
    return groups


def _panels(groups: dict[PretrainKey, PretrainGroup]) -> dict[tuple[str, str], list[PretrainGroup]]:
    """(scale, model) → its groups, in row order: one figure panel or table per model."""
    panels: dict[tuple[str, str], list[PretrainGroup]] = defaultdict(list)
    for key, group in groups.items():
        panels[key.scale, key.model].append(group)
    return dict(panels)


def _excluded_notes(runs: Sequence[PretrainRun]) -> list[str]:
    left_out = [r for r in runs if r.run.status != "completed"]
    return [f"- Left out (not completed): {len(left_out)} run(s): "
            + ", ".join(f"{r.dir.name} ({r.run.status or 'no summary'})" for r in left_out)] if left_out else []


# ---------------------------------------------------------------- labels and figures


def _panel_title(group: PretrainGroup) -> str:
    return f"{group.key.scale} scale, {group.model_label}"


def _new_figure(panels: int) -> Figure:
    return new_figure(6.4 * panels, 4.6)


def moving_average(curve: dict[int, float], window: int) -> dict[int, float]:
    """Trailing mean over the last ``window`` logged points (fewer at the start); 1 = unchanged."""
    steps, values = list(curve), list(curve.values())
    return {s: sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i, s in enumerate(steps)}


def plot_fig4(runs: Sequence[PretrainRun], out_path: str | Path | None = None, smooth: int = 1) -> Figure:
    """Paper Fig. 4: training loss of every method, one panel per (scale, model), mean ± 1 std over
    seeds; with ``smooth`` > 1 each seed's curve is first averaged over its last ``smooth`` logged
    points (stated in the title). Saves ``<stem>.png`` and ``.pdf`` when ``out_path`` is given.
    Raises ValueError when there is no completed C4 run."""
    panels = _panels(group_pretrain_runs(runs))
    if not panels:
        raise ValueError("Fig. 4 needs completed C4 runs; none found")
    fig = _new_figure(len(panels))
    all_groups = [g for groups in panels.values() for g in groups]
    with_op = operators_vary(all_groups)
    for i, groups in enumerate(panels.values()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        keys = [g.key for g in groups]
        for g in groups:
            smoothed = replace(g, loss=aggregate_curves(moving_average(r.run.loss, smooth) for r in g.runs))
            # colour is the method; a method drawn with several operators gets one line style per operator
            draw_loss(ax, smoothed, line_label(g, with_op), method_style(g.key.method).color, line_style(g.key, keys))
        ax.set(xlabel="training step", ylabel="training loss (mean since previous log)",
               title=f"({chr(97 + i)}) {_panel_title(groups[0])}")
        ax.title.set_fontsize(10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    smoothing = f"; moving average over {smooth} logged points" if smooth > 1 else ""
    fig.suptitle(f"Fig. 4 — C4 pretraining loss\n(mean ± std over {seeds_text(all_groups)}{smoothing})",
                 fontsize=11)
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


# ---------------------------------------------------------------- Table 3


def _paper_cells(method: str) -> list[str]:
    return [f"{v:.2f}" for v in PAPER_TABLE3[method]] if method in PAPER_TABLE3 else ["—"] * len(PAPER_TABLE3_MODELS)


def ranking_notes(rows: Sequence[PretrainGroup]) -> list[str]:
    """Our ranking (lowest perplexity first), whether the paper's ordering holds among its methods
    present (the best row of a method with several), and adjacent gaps within one std."""
    with_op = operators_vary(rows)
    scored = sorted((g for g in rows if g.perplexity.n), key=lambda g: g.perplexity.mean)
    if not scored:
        return ["- Ranking: no row has a validation perplexity."]
    ranking = " < ".join(f"{method_label(g.key, with_op)} {g.perplexity.mean:.2f}" for g in scored)
    notes = [f"- Ranking, ours (lowest perplexity first): {ranking}."]
    best: dict[str, PretrainGroup] = {}
    for g in scored:
        best.setdefault(g.key.method, g)
    paper = [m for m in PAPER_ORDER if m in best]
    ours = [m for m in best if m in PAPER_TABLE3]  # ascending, as ``scored``
    if len(paper) < 2:
        notes.append(f"- The paper's ordering ({_chain(PAPER_ORDER)}) cannot be checked: fewer than two of "
                     "its methods have a perplexity here.")
    else:
        among = "" if len(paper) == len(PAPER_ORDER) else f" (among the methods present: {_chain(paper)})"
        verdict = "holds in ours" if ours == paper else f"does NOT hold in ours: ours is {_chain(ours)}"
        several = any(sum(g.key.method == m for g in scored) > 1 for m in paper)
        best_row = " (each method by its lowest-perplexity row)" if several else ""
        notes.append(f"- The paper's ordering {_chain(PAPER_ORDER)}{among} {verdict}{best_row}.")
    close = [f"{method_label(a.key, with_op)} vs {method_label(b.key, with_op)}" for a, b in zip(scored, scored[1:])
             if b.perplexity.mean - a.perplexity.mean < max(_std(a.perplexity), _std(b.perplexity))]
    if close:
        notes.append(f"- Gaps smaller than one std (order not resolved by these seeds): {', '.join(close)}.")
    return notes


def _chain(methods: Iterable[str]) -> str:
    return " < ".join(method_style(m).label for m in methods)


def _std(stat: Stat) -> float:
    return 0.0 if math.isnan(stat.std) else stat.std


def _eval_notes(rows: Sequence[PretrainGroup]) -> list[str]:
    runs = [r for g in rows for r in g.runs if r.perplexity]
    steps = sorted({max(r.perplexity) for r in runs})
    tokens = sorted({r.eval_tokens for r in runs if r.eval_tokens is not None})
    differs = " (differs between runs)"
    where = "never" if not steps else f"at step {steps[0]}" if len(steps) == 1 else (
        f"at steps {', '.join(map(str, steps))}{differs}")
    on = "" if not tokens else f" on {tokens[0]:,} validation tokens" if len(tokens) == 1 else (
        f" on {', '.join(f'{t:,}' for t in tokens)} validation tokens{differs}")
    return [f"- Perplexity = exp(mean token cross-entropy), evaluated {where}{on} (each run's last evaluation)."]


def _table3_section(rows: list[PretrainGroup]) -> list[str]:
    with_op = operators_vary(rows)
    first = rows[0]
    header = ["Method", "Rank", "lr", "ours: perplexity mean ± std (n)",
              *(f"paper {m}" for m in PAPER_TABLE3_MODELS)]
    lines = [f"### {_panel_title(first)}", "",
             f"Measured at **{first.key.scale} scale** on **{first.model_label}**, {seeds_text(rows)}; "
             f"the paper's columns are its {' and '.join(PAPER_TABLE3_MODELS)} models, shown for comparison "
             + ("(a mini model is not the 250M one: compare orderings, not values)." if first.key.scale == "mini"
                else "(compare with the column of the matching size)."), "",
             f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for g in rows:
        grid = f" (of {', '.join(f'{lr:g}' for lr in g.rates_tried)})" if len(g.rates_tried) > 1 else ""
        cells = [method_label(g.key, with_op), rank_label(g), f"{g.lr:g}{grid}", format_stat(g.perplexity, 2),
                 *_paper_cells(g.key.method)]
        lines.append(f"| {' | '.join(cells)} |")
    selection = [f"- lr: the chosen rate (in parentheses every rate tried). {PRETRAIN_SELECTION_RULE}"] \
        if any(len(g.rates_tried) > 1 for g in rows) else []
    return lines + ["", *_eval_notes(rows), *selection, *ranking_notes(rows), ""]


def table3_markdown(runs: Sequence[PretrainRun]) -> str:
    """Paper Table 3 as Markdown: per (scale, model), each method's validation perplexity as
    "mean ± std (n)" beside the paper's 250M and 1.3B numbers ("—" where it has none, e.g. FFT),
    with the scale and model measured, the ranking, and whether the paper's ordering holds."""
    panels = _panels(group_pretrain_runs(runs))
    if not panels:
        raise ValueError("Table 3 needs completed C4 runs; none found")
    scales = "/".join(sorted({scale for scale, _ in panels}))
    notes = ["- Ours: mean ± sample std over seeds (n seeds evaluated) of each run's final validation "
             "perplexity. Paper: its published Table 3 (LLaMA-style 250M and 1.3B models, 10K steps, batch "
             f"1024 × 512 tokens, r = {PAPER_RANK}); not our result.",
             "- Rank: the paper's r (a LoRA parameter budget); in parentheses the rank used at this scale's width.",
             *_excluded_notes(runs)]
    sections = [line for rows in panels.values() for line in _table3_section(rows)]
    return "\n".join([f"## Table 3 — C4 validation perplexity ({scales} scale; ours beside the paper's)", "",
                      *sections, *notes]) + "\n"


def lr_sweep_markdown(root: str | Path, **filters: Any) -> str:
    """A learning-rate sweep as Markdown: per (scale, model, method, operator, rank), the final
    validation perplexity of every learning rate tried, "mean ± std (n)" over completed seeds, the
    lowest in bold. It shows how a preset's learning rates were chosen (``make pretrain-lr-sweep``)."""
    runs = [pretrain_run_from_record(r) for r in find_runs(root, **{"task.name": TASK, **filters})]
    cells: dict[PretrainKey, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.run.status == "completed" and run.perplexity:
            cells[run.key][run.run.lr].append(run.final_perplexity)
    if not cells:
        raise ValueError(f"no completed C4 runs with a validation perplexity under {root}")
    lrs = sorted({lr for by_lr in cells.values() for lr in by_lr})
    lines = ["## C4 learning-rate sweep — final validation perplexity (lower is better)", "",
             "| scale | model | method | rank | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|---|---|" + "---|" * len(lrs)]
    for key in sorted(cells, key=lambda k: (k.scale, k.model, *_row_order(k))):
        stats = {lr: mean_std(values) for lr, values in cells[key].items()}
        best = min(stats, key=lambda lr: stats[lr].mean)
        row = [f"**{format_stat(stats[lr])}**" if lr == best else format_stat(stats[lr]) if lr in stats else "—"
               for lr in lrs]
        method = key.method + (f" ({key.operator})" if key.operator else "")
        lines.append(f"| {key.scale} | {key.model} | {method} | {key.rank if key.rank is not None else '–'} | "
                     + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Fig. 5


@dataclass(frozen=True)
class SpectrumCounts:
    """Fig. 5 for one group: module type → count of σ > threshold (mean over layers), as
    :class:`Stat` over the seeds that saved spectra, and the most a count can be (min(d, k))."""

    group: PretrainGroup
    counts: dict[str, Stat]
    full_rank: dict[str, int]


def spectrum_counts(runs: Sequence[PretrainRun], threshold: float = FIG5_THRESHOLD) -> list[SpectrumCounts]:
    """:class:`SpectrumCounts` of every group (row order) with at least one ``spectra.safetensors``."""
    # experiments.evaluation.spectra pulls in torch and peft; import it only when spectra are read
    from experiments.evaluation.spectra import SPECTRA_FILE, count_above, load_spectra, module_type

    results = []
    for group in group_pretrain_runs(runs).values():
        spectra = [load_spectra(r.dir / SPECTRA_FILE) for r in group.runs if (r.dir / SPECTRA_FILE).exists()]
        if not spectra:
            continue
        per_seed = [count_above(s, threshold) for s in spectra]
        types = list(dict.fromkeys(t for counts in per_seed for t in counts))
        full = {module_type(n): len(v) for n, v in spectra[0].items()}
        results.append(SpectrumCounts(group, {t: mean_std(c[t] for c in per_seed if t in c) for t in types},
                                      {t: full[t] for t in types if t in full}))
    return results


def _spectrum_panels(runs: Sequence[PretrainRun], threshold: float) -> dict[tuple[str, str], list[SpectrumCounts]]:
    """(scale, model) → :func:`spectrum_counts` of its groups; ValueError when there are none."""
    panels: dict[tuple[str, str], list[SpectrumCounts]] = defaultdict(list)
    for result in spectrum_counts(runs, threshold):
        panels[result.group.key.scale, result.group.key.model].append(result)
    if not panels:
        raise ValueError("Fig. 5 needs completed C4 runs with spectra.safetensors; none found")
    return dict(panels)


def _short(module: str) -> str:
    return module.removesuffix("_proj")


def _count_label(threshold: float) -> str:
    return f"singular values > {threshold:g} in ΔW (mean over layers)"


def plot_fig5(runs: Sequence[PretrainRun], out_path: str | Path | None = None,
              threshold: float = FIG5_THRESHOLD) -> Figure:
    """Paper Fig. 5: grouped bars, per module type (q, k, v, o, up, down, gate), of the number of
    singular values of ΔW above ``threshold`` (mean over layers), one bar per method, mean over seeds
    with ±1 std error bars; black ticks mark min(d, k). One panel per (scale, model).
    Raises ValueError when no completed run saved spectra."""
    panels = _spectrum_panels(runs, threshold)
    groups = [r.group for rows in panels.values() for r in rows]
    fig = _new_figure(len(panels))
    with_op = operators_vary(groups)
    for i, rows in enumerate(panels.values()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _draw_bars(ax, rows, with_op)
        ax.set(ylabel=_count_label(threshold), title=f"({chr(97 + i)}) {_panel_title(rows[0].group)}")
        ax.title.set_fontsize(10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 5 — singular values of ΔW above {threshold:g}\n(mean ± std over {seeds_text(groups)})",
                 fontsize=11)
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def _draw_bars(ax, rows: list[SpectrumCounts], with_op: bool) -> None:
    types = list(dict.fromkeys(t for r in rows for t in r.counts))
    width = 0.8 / len(rows)
    for j, result in enumerate(rows):
        stats = [result.counts.get(t, Stat(math.nan, math.nan, 0)) for t in types]
        xs = [x - 0.4 + width * (j + 0.5) for x in range(len(types))]
        ax.bar(xs, [s.mean for s in stats], width, yerr=[s.std for s in stats], capsize=2,  # NaN std: no bar
               color=method_style(result.group.key.method).color, label=_bar_label(result.group, with_op))
    full = [max(r.full_rank.get(t, 0) for r in rows) for t in types]
    ax.scatter(range(len(types)), full, marker="_", s=600, color="black", label="min(d, k)")
    ax.set_xticks(range(len(types)), [_short(t) for t in types])


def _bar_label(group: PretrainGroup, with_op: bool) -> str:
    name = method_label(group.key, with_op)
    return f"{name} r={rank_label(group)}" if group.key.rank is not None else name


def fig5_markdown(runs: Sequence[PretrainRun], threshold: float = FIG5_THRESHOLD) -> str:
    """Fig. 5's numbers as Markdown, one table per (scale, model): per method, the count of singular
    values > ``threshold`` per module type as "mean ± std (n seeds)", and min(d, k) for scale."""
    panels = _spectrum_panels(runs, threshold)
    with_op = operators_vary(r.group for rows in panels.values() for r in rows)
    lines = [f"## Fig. 5 — number of {_count_label(threshold)}", ""]
    for rows in panels.values():
        types = list(dict.fromkeys(t for r in rows for t in r.counts))
        header = ["Method", "Rank", *(_short(t) for t in types)]
        lines += [f"### {_panel_title(rows[0].group)}", "", f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
        for r in rows:
            cells = [format_stat(r.counts[t]) if t in r.counts else "—" for t in types]
            lines.append(f"| {method_label(r.group.key, with_op)} | {rank_label(r.group)} | {' | '.join(cells)} |")
        full = [str(max(r.full_rank.get(t, 0) for r in rows)) for t in types]
        lines += [f"| min(d, k) | | {' | '.join(full)} |", ""]
    notes = [f"- ΔW = W_final − W_init of the weight each layer applies (pending adapters included); singular "
             f"values in float32 (ReLoRA's method); per layer the count of σ > {threshold:g}, averaged over the "
             "layers of each module type, then mean ± sample std over seeds (n).",
             "- The paper's Fig. 5 (250M model) gives no numbers; compare which methods reach high counts.",
             *_missing_spectra_notes(runs), *_excluded_notes(runs)]
    return "\n".join(lines + notes) + "\n"


def _missing_spectra_notes(runs: Sequence[PretrainRun]) -> list[str]:
    from experiments.evaluation.spectra import SPECTRA_FILE

    missing = [r.dir.name for r in runs if r.run.status == "completed" and not (r.dir / SPECTRA_FILE).exists()]
    return [f"- Completed runs without spectra.safetensors (not counted): {', '.join(missing)}"] if missing else []


# ---------------------------------------------------------------- everything at once


def write_pretrain_report(runs: Sequence[PretrainRun], out_dir: str | Path, threshold: float = FIG5_THRESHOLD,
                          smooth: int = 1) -> tuple[list[Path], list[str]]:
    """Write fig4.{png,pdf}, table3.md, fig5.{png,pdf} and fig5.md into ``out_dir``.

    Returns (paths written, reasons for what was skipped): a figure or table with nothing to show
    is skipped with its reason rather than failing the others.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    figures = (("fig4", lambda: plot_fig4(runs, smooth=smooth)), ("fig5", lambda: plot_fig5(runs, threshold=threshold)))
    for name, plot in figures:
        try:
            written += save_figure(plot(), out_dir / name)
        except ValueError as err:
            skipped.append(f"{name}: {err}")
    tables = (("table3.md", lambda: table3_markdown(runs)), ("fig5.md", lambda: fig5_markdown(runs, threshold)))
    for name, make in tables:
        try:
            (out_dir / name).write_text(make(), encoding="utf-8")
            written.append(out_dir / name)
        except ValueError as err:
            skipped.append(f"{name}: {err}")
    return written, skipped
