"""Run folders → tidy records → one learning rate per (method, rank) → mean ± std over seeds.

The paper reports, for each method and rank, the best run of a small learning-rate grid (Section 3:
LoRA searches {1e-4, 2e-4, 3e-4}; Section 5.1: MoRA searches {5e-5, 1e-4, 2e-4}). We do the same,
with the rule spelled out in :data:`SELECTION_RULE`, and average the chosen learning rate's seeds.
Everything here reads files through :func:`experiments.loop.records.find_runs`; nothing trains.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from experiments.loop.records import find_runs

CHAR_ACCURACY, EXACT_MATCH, LOSS = "eval/char_accuracy", "eval/exact_match", "loss"

SELECTION_RULE = (
    "For each (method, operator, paper rank) group, every learning rate tried is scored by the mean "
    "over its seeds of the final character accuracy (the accuracy at each run's last evaluated step). "
    "The highest score wins; ties go to the lower mean final training loss, then to the smaller "
    "learning rate. A learning rate is eligible only if every one of its seeds completed (a diverged "
    "or unfinished seed disqualifies it). As in the paper (Sections 3 and 5.1), the learning rate is "
    "chosen on the same metric that is reported, so the reported numbers are best-of-grid.")


class GroupKey(NamedTuple):
    """What a table row or a figure line stands for; ``rank`` is None for full fine-tuning."""

    method: str
    operator: str | None
    rank: int | None


@dataclass(frozen=True)
class Run:
    """One run folder, reduced to what tables and figures need.

    ``rank`` is the paper's rank (a LoRA parameter budget) and ``effective_rank`` the rank it maps
    to on this scale's width; both are None for a method without adapters (full fine-tuning).
    Curves map step → value: ``loss`` at every logged step (the mean training loss since the
    previous log line), the accuracies (percent) at every evaluated step.
    """

    dir: Path
    task: str
    scale: str
    method: str
    operator: str | None
    rank: int | None
    effective_rank: int | None
    rank_mapping: str | None
    lr: float
    seed: int
    status: str | None
    loss: dict[int, float]
    char_accuracy: dict[int, float]
    exact_match: dict[int, float]

    @property
    def key(self) -> GroupKey:
        return GroupKey(self.method, self.operator, self.rank)

    @property
    def final_char_accuracy(self) -> float:
        """Character accuracy at the last evaluated step (NaN if never evaluated)."""
        return self.char_accuracy[max(self.char_accuracy)] if self.char_accuracy else math.nan

    @property
    def final_loss(self) -> float:
        """Training loss at the last logged step (NaN if none)."""
        return self.loss[max(self.loss)] if self.loss else math.nan


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; NaN when n < 2) of n values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Candidate:
    """One learning rate of a group: its seeds and the scores the selection rule uses."""

    lr: float
    runs: tuple[Run, ...]
    final_char_accuracy: Stat
    final_loss: Stat
    eligible: bool


@dataclass(frozen=True)
class Selection:
    """Every learning rate tried for a group (by increasing lr) and the one chosen (None if none is eligible)."""

    key: GroupKey
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None


@dataclass(frozen=True)
class Group:
    """The chosen learning rate's runs of one (method, operator, rank), aggregated over seeds per step."""

    key: GroupKey
    lr: float
    runs: tuple[Run, ...]
    loss: dict[int, Stat]
    char_accuracy: dict[int, Stat]
    exact_match: dict[int, Stat]

    @property
    def effective_rank(self) -> int | None:
        return self.runs[0].effective_rank

    @property
    def rank_mapping(self) -> str | None:
        return self.runs[0].rank_mapping

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(run.seed for run in self.runs))


# ---------------------------------------------------------------- loading


def metric_curve(metrics: list[dict], name: str) -> dict[int, float]:
    """step → value of ``name`` over the metric lines that carry it."""
    return {int(m["step"]): float(m[name]) for m in metrics if name in m}


def run_from_record(record: dict[str, Any]) -> Run:
    """A :class:`Run` from :func:`experiments.loop.records.read_run`'s dict.

    A method that targets no modules trains no adapter (full fine-tuning), so it has no rank.
    """
    config, metrics = record["config"], record["metrics"]
    method, resolved = config["method"], config.get("resolved", {})
    has_adapter = bool(method.get("target_modules"))
    return Run(dir=Path(record["dir"]), task=config["task"]["name"], scale=config["scale"]["name"],
               method=method["name"], operator=method.get("operator"),
               rank=config["rank"] if has_adapter else None,
               effective_rank=resolved.get("effective_rank") if has_adapter else None,
               rank_mapping=resolved.get("rank_mapping") if has_adapter else None,
               lr=float(resolved.get("lr", config.get("lr"))), seed=int(config["seed"]),
               status=(record["summary"] or {}).get("status"), loss=metric_curve(metrics, LOSS),
               char_accuracy=metric_curve(metrics, CHAR_ACCURACY),
               exact_match=metric_curve(metrics, EXACT_MATCH))


def load_runs(root: str | Path, task: str = "uuid", scale: str | None = None, **filters: Any) -> list[Run]:
    """Every run of ``task`` under ``root`` (at ``scale``; None: the one scale present), as :class:`Run`.

    ``filters`` are dotted config keys passed to :func:`find_runs`, e.g. ``**{"train.max_steps": 300}``.
    Raises ValueError if runs of several scales are found and none was asked for, or if two folders
    hold the same (method, operator, rank, lr, seed): averaging them would count one seed twice.
    """
    wanted = {"task.name": task, **({"scale.name": scale} if scale else {}), **filters}
    runs = [run_from_record(record) for record in find_runs(root, **wanted)]
    scales = sorted({run.scale for run in runs})
    if len(scales) > 1:
        raise ValueError(f"runs of several scales under {root}: {scales}; choose one")
    check_unique(runs)
    return runs


def check_unique(runs: Iterable[Any], identity: Callable[[Any], tuple] = lambda run: (*run.key, run.lr, run.seed),
                 fields: str = "(method, operator, rank, lr, seed)") -> None:
    """Raise ValueError naming the folders (``run.dir``) that repeat an ``identity`` (whose parts
    ``fields`` names): averaging them would count one seed twice."""
    seen: dict[tuple, list[Path]] = defaultdict(list)
    for run in runs:
        seen[identity(run)].append(run.dir)
    repeats = {key: dirs for key, dirs in seen.items() if len(dirs) > 1}
    if repeats:
        lines = "; ".join(f"{key}: {[str(d) for d in dirs]}" for key, dirs in repeats.items())
        raise ValueError(f"several runs share {fields}: {lines}; narrow the selection with config filters")


# ---------------------------------------------------------------- aggregation


def mean_std(values: Iterable[float]) -> Stat:
    """:class:`Stat` of ``values``: mean, sample std (ddof=1, NaN for fewer than two), n."""
    values = list(values)
    if not values:
        return Stat(math.nan, math.nan, 0)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return Stat(statistics.fmean(values), std, len(values))


def aggregate_curves(curves: Iterable[dict[int, float]]) -> dict[int, Stat]:
    """step → :class:`Stat` over the curves that have that step (so n may vary by step), by step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, value in curve.items():
            by_step[step].append(value)
    return {step: mean_std(by_step[step]) for step in sorted(by_step)}


def _group(key: GroupKey, lr: float, runs: tuple[Run, ...]) -> Group:
    return Group(key=key, lr=lr, runs=runs, loss=aggregate_curves(r.loss for r in runs),
                 char_accuracy=aggregate_curves(r.char_accuracy for r in runs),
                 exact_match=aggregate_curves(r.exact_match for r in runs))


# ---------------------------------------------------------------- learning-rate selection


def _candidate(lr: float, runs: tuple[Run, ...]) -> Candidate:
    eligible = all(run.status == "completed" and not math.isnan(run.final_char_accuracy) for run in runs)
    return Candidate(lr=lr, runs=runs, final_char_accuracy=mean_std(r.final_char_accuracy for r in runs),
                     final_loss=mean_std(r.final_loss for r in runs), eligible=eligible)


def _score(candidate: Candidate) -> tuple[float, float, float]:
    """Sort key implementing :data:`SELECTION_RULE`: the largest tuple wins."""
    loss = candidate.final_loss.mean
    return candidate.final_char_accuracy.mean, -loss if not math.isnan(loss) else -math.inf, -candidate.lr


def select_learning_rates(runs: Iterable[Run]) -> list[Selection]:
    """One :class:`Selection` per (method, operator, rank), in sorted key order (see :data:`SELECTION_RULE`)."""
    by_key: dict[GroupKey, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_key[run.key][run.lr].append(run)
    selections = []
    for key in sorted(by_key, key=_sortable):
        candidates = tuple(_candidate(lr, tuple(sorted(rs, key=lambda r: r.seed)))
                           for lr, rs in sorted(by_key[key].items()))
        eligible = [c for c in candidates if c.eligible]
        selections.append(Selection(key, candidates, max(eligible, key=_score) if eligible else None))
    return selections


def _sortable(key: GroupKey) -> tuple:
    return key.method, key.operator or "", -1 if key.rank is None else key.rank


def best_groups(runs: Iterable[Run]) -> dict[GroupKey, Group]:
    """The chosen learning rate's :class:`Group` for every group that has an eligible one."""
    return {s.key: _group(s.key, s.chosen.lr, s.chosen.runs)
            for s in select_learning_rates(runs) if s.chosen is not None}


def common_eval_steps(groups: Iterable[Group]) -> tuple[int, ...]:
    """The evaluated steps every run of ``groups`` has, in order."""
    step_sets = [set(run.char_accuracy) for group in groups for run in group.runs]
    return tuple(sorted(set.intersection(*step_sets))) if step_sets else ()


# ---------------------------------------------------------------- reporting


def format_stat(stat: Stat, digits: int = 1) -> str:
    """``mean ± std (n)``; the ± part is dropped when there is one value."""
    if stat.n == 0:
        return "—"
    spread = "" if math.isnan(stat.std) else f" ± {stat.std:.{digits}f}"
    return f"{stat.mean:.{digits}f}{spread} ({stat.n})"


def seeds_text(groups: Sequence[Any]) -> str:
    """``3 seeds`` (or ``2–3 seeds`` when the groups differ) for a title."""
    counts = sorted({len(g.runs) for g in groups})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"{n} seed{'s' if counts[-1] > 1 else ''}"


def rank_label(group: Group) -> str:
    """The paper's rank, with the rank used at this scale when it differs: ``8 (mini 1)``."""
    if group.key.rank is None:
        return "–"
    run = group.runs[0]
    differs = group.effective_rank is not None and group.effective_rank != group.key.rank
    return f"{group.key.rank} ({run.scale} {group.effective_rank})" if differs else str(group.key.rank)


def _key_label(key: GroupKey) -> str:
    parts = [key.method] + ([key.operator] if key.operator else []) + ([f"r{key.rank}"] if key.rank else [])
    return " ".join(parts)


def selection_markdown(selections: Iterable[Selection]) -> str:
    """The rule and every candidate learning rate with its scores, the chosen one in bold."""
    lines = [f"Rule: {SELECTION_RULE}", "",
             "| group | lr | final char. acc. % mean ± std (n) | final loss mean ± std (n) | status |",
             "|---|---|---|---|---|"]
    for selection in selections:
        for c in selection.candidates:
            chosen = c is selection.chosen
            status = "**chosen**" if chosen else ("eligible" if c.eligible else "not eligible (a seed did not complete)")
            lr = f"**{c.lr:g}**" if chosen else f"{c.lr:g}"
            lines.append(f"| {_key_label(selection.key)} | {lr} | {format_stat(c.final_char_accuracy)} | "
                         f"{format_stat(c.final_loss, 3)} | {status} |")
    return "\n".join(lines) + "\n"
