"""Tables 1, 4 and 6 (Section 5.2, Section 6.2, Appendix C) from fine-tuning run folders, ours beside the paper's.

A fine-tuning run ends with lm-eval (``experiments/evaluation/harness.py``); its summary holds every score as
``lm_eval/<task>/<metric>`` (the whole test set) or ``lm_eval_first<N>/<task>/<metric>`` (its first N
documents). Which lm-eval tasks stand for which paper column is data here (:data:`COLUMNS`): the paper
scale's benchmarks (MMLU, GSM8K, MATH, the AdaptLLM sets) and the mini scale's stand-ins, which score
what a 260K-parameter model can show (held-out answer log-likelihood, perplexity on held-out domain text,
multiple-choice accuracy by log-likelihood; lm_eval_tasks/README.md). A table shows the columns its runs
have. Nothing here trains.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from analysis.methods import method_label
from analysis.runs import Stat, check_unique, format_stat, mean_std
from experiments.loop.records import find_runs
from mora.adapters import METHOD_LAYERS

FINETUNE_TASKS = ("tulu", "metamath", "biomed", "finance")
_SCORE_KEY = re.compile(r"^lm_eval(?:_first(?P<limit>\d+))?/(?P<task>.+)/(?P<metric>[^/]+)$")


@dataclass(frozen=True)
class Metric:
    """One reported score: lm-eval task × metric, how it reads, and which way is better."""

    lm_eval_task: str
    name: str
    label: str
    higher_is_better: bool
    percent: bool = False   # a fraction shown ×100, as the paper's tables do

    def show(self, value: float) -> float:
        return 100.0 * value if self.percent else value


def _nll(task: str, label: str) -> Metric:
    return Metric(task, "nll_per_token", f"{label} NLL (nats/token) ↓", higher_is_better=False)


def _acc(task: str, label: str, metric: str = "acc") -> Metric:
    return Metric(task, metric, f"{label} % ↑", higher_is_better=True, percent=True)


# Per fine-tuning task: the paper's benchmarks (paper scale) and the mini stand-ins, in column order.
# The first metric a run has is its task's primary score (it picks the learning rate when a group
# has several; see select_lr).
COLUMNS: dict[str, tuple[Metric, ...]] = {
    "tulu": (_acc("mmlu", "MMLU 0-shot"), _acc("mmlu@5shot", "MMLU 5-shot"),
             _nll("alpaca_local_nll", "held-out Alpaca response")),
    "metamath": (_acc("gsm8k_metamath", "GSM8K", "exact_match"), _acc("math_metamath", "MATH", "exact_match"),
                 _nll("gsm8k_local_answer_nll", "GSM8K answer"),
                 _acc("gsm8k_local_metamath", "GSM8K exact match", "exact_match")),
    "biomed": (_acc("biomed_adaptllm", "BioMed. avg."), _acc("pubmedqa_adaptllm", "PubMedQA"),
               _acc("usmle_adaptllm", "USMLE"), _acc("mmlu_biomed", "BioMMLU"), _acc("rct_adaptllm", "RCT"),
               Metric("pubmed_abstracts_ppl", "bits_per_byte", "held-out abstracts bits/byte ↓", False),
               _acc("pubmedqa_local", "PubMedQA-L")),
    "finance": (_acc("finance_adaptllm", "Finance avg.", "score"), _acc("convfinqa_adaptllm", "ConvFinQA", "score"),
                _acc("fiqa_sa_adaptllm", "FiQA SA", "score"), _acc("headline_adaptllm", "Headline", "score"),
                _acc("ner_adaptllm", "NER", "score"), _acc("fpb_adaptllm", "FPB", "score")),
}

# The paper's numbers (percent). Table 1: (MMLU 0, MMLU 5, GSM8K, MATH, BioMed., Finance); None = "-".
PAPER_TABLE1: dict[tuple[str, int | None], tuple[float | None, ...]] = {
    ("fft", None): (50.6, 51.3, 66.6, 20.1, 56.4, 69.6),
    ("lora", 8): (50.2, 51.5, 64.6, 15.1, 52.3, 64.0),
    ("loraplus", 8): (49.2, 51.1, 64.1, 15.8, 52.2, 64.9),
    ("relora", 8): (49.3, 50.2, 61.5, 14.5, 46.3, 61.0),
    ("asylora", 8): (50.3, 52.2, 64.5, 15.0, 52.5, 63.5),
    ("dora", 8): (50.2, 51.5, 64.5, 14.6, 52.5, 63.9),
    ("mora", 8): (49.7, 51.5, 64.2, 15.4, 53.3, 67.1),
    ("lora", 256): (49.7, 50.8, 67.9, 19.9, 54.1, 67.3),
    ("loraplus", 256): (49.2, 51.3, 68.2, 17.1, 54.2, 66.7),
    ("relora", 256): (None, None, 64.0, 18.1, 52.9, 57.9),
    ("asylora", 256): (50.1, 52.0, 66.9, 19.3, 54.1, 66.9),
    ("dora", 256): (49.6, 51.1, 67.4, 19.5, 54.2, 66.0),
    ("mora", 256): (49.9, 51.4, 67.9, 19.2, 55.4, 68.7),
}
PAPER_TABLE1_COLUMNS = ("MMLU 0", "MMLU 5", "GSM8K", "MATH", "BioMed.", "Finance")
# Which Table 1 paper columns belong to which of our tasks.
PAPER_TABLE1_TASK_COLUMNS = {"tulu": (0, 1), "metamath": (2, 3), "biomed": (4,), "finance": (5,)}
# The operator of a Table 1 row (Section 5.2.2): MoRA's rotation (Eq. 9) at r = 8, sharing (Eq. 6) at
# r = 256; the other methods have none.
TABLE1_OPERATORS: dict[tuple[str, int], str] = {("mora", 8): "rotate", ("mora", 256): "share"}
TABLE1_METHODS = ("lora", "loraplus", "relora", "asylora", "dora", "mora")
TABLE1_RANKS = (8, 256)

# Table 4: GSM8K by operator at r = 8 and r = 256.
PAPER_TABLE4: dict[str, tuple[str, float, float]] = {
    "truncate": ("Eq. 4", 59.5, 66.6), "share": ("Eq. 6", 62.5, 67.9),
    "decouple": ("Eq. 8", 63.6, 67.8), "rotate": ("Eq. 9", 64.2, 67.9),
}

# Table 6 (biomedicine): (PubMedQA, USMLE, BioMMLU, RCT, Avg.); Table 7 (finance): (ConvFinQA,
# FiQA SA, Headline, NER, FPB, Avg.).
PAPER_TABLE6_COLUMNS = ("PubMedQA", "USMLE", "BioMMLU", "RCT", "Avg.")
PAPER_TABLE6: dict[tuple[str, int | None], tuple[float, ...]] = {
    ("fft", None): (74.1, 41.2, 47.5, 62.7, 56.4), ("lora", 8): (73.1, 34.9, 45.3, 54.9, 51.9),
    ("mora", 8): (73.3, 34.7, 45.3, 59.9, 53.3), ("lora", 256): (73.8, 39.7, 46.0, 56.9, 54.1),
    ("mora", 256): (74.4, 40.4, 46.1, 60.6, 55.4),
}
PAPER_TABLE7_COLUMNS = ("ConvFinQA", "FiQA SA", "Headline", "NER", "FPB", "Avg.")
PAPER_TABLE7: dict[tuple[str, int | None], tuple[float, ...]] = {
    ("fft", None): (44.4, 78.8, 82.3, 68.1, 74.3, 69.6), ("lora", 8): (44.5, 76.2, 72.4, 61.6, 65.1, 64.0),
    ("mora", 8): (45.8, 76.6, 76.3, 68.9, 68.2, 67.1), ("lora", 256): (41.4, 78.3, 83.0, 66.8, 66.7, 67.3),
    ("mora", 256): (47.7, 76.3, 83.4, 68.0, 68.1, 68.7),
}
APPENDIX_C_ROWS = (("fft", None), ("lora", 8), ("mora", 8), ("lora", 256), ("mora", 256))


class ArmKey(NamedTuple):
    """A table row: method, MoRA's operator (None for other methods) and the paper's rank (None for FFT)."""

    method: str
    operator: str | None
    rank: int | None


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run folder: its arm, learning rate, seed and final lm-eval scores.

    ``scores`` maps (lm-eval task, metric) → value; ``limits`` maps an lm-eval task to the number of
    documents it was limited to (None: the whole test set)."""

    dir: Path
    task: str
    scale: str
    key: ArmKey
    effective_rank: int | None
    rank_mapping: str | None
    lr: float
    seed: int
    status: str | None
    scores: dict[tuple[str, str], float]
    limits: dict[str, int | None]

    def score(self, metric: Metric) -> float:
        return self.scores.get((metric.lm_eval_task, metric.name), math.nan)


def parse_scores(final: dict[str, Any]) -> tuple[dict[tuple[str, str], float], dict[str, int | None]]:
    """The lm-eval scores of a run summary's ``final`` dict, and each lm-eval task's document limit."""
    scores, limits = {}, {}
    for key, value in final.items():
        match = _SCORE_KEY.match(key)
        if match and isinstance(value, (int, float)):
            scores[match["task"], match["metric"]] = float(value)
            limits[match["task"]] = int(match["limit"]) if match["limit"] else None
    return scores, limits


def finetune_run_from_record(record: dict[str, Any]) -> FinetuneRun:
    """A :class:`FinetuneRun` from :func:`experiments.loop.records.read_run`'s dict."""
    config, summary = record["config"], record["summary"] or {}
    method, resolved = config["method"], config.get("resolved", {})
    layer_kind = METHOD_LAYERS[method["name"]]
    # the experiment presets set method.operator for every method; only MoRA layers use it
    key = ArmKey(method["name"], method.get("operator") if layer_kind == "mora" else None,
                 config["rank"] if layer_kind is not None else None)
    scores, limits = parse_scores(summary.get("final", {}))
    return FinetuneRun(dir=Path(record["dir"]), task=config["task"]["name"], scale=config["scale"]["name"], key=key,
                       effective_rank=resolved.get("effective_rank") if layer_kind else None,
                       rank_mapping=resolved.get("rank_mapping") if layer_kind else None,
                       lr=float(resolved.get("lr", config.get("lr"))), seed=int(config["seed"]),
                       status=summary.get("status"), scores=scores, limits=limits)


def load_finetune_runs(root: str | Path, **filters: Any) -> list[FinetuneRun]:
    """Every fine-tuning run under ``root`` (tasks :data:`FINETUNE_TASKS`) matching the dotted config ``filters``.

    Raises ValueError when two folders hold the same (task, scale, arm, lr, seed): averaging them would
    count one seed twice."""
    runs = [finetune_run_from_record(record) for record in find_runs(root, **filters)
            if (record["config"].get("task") or {}).get("name") in FINETUNE_TASKS]  # one walk of the tree
    check_unique(runs, identity=lambda run: (run.task, run.scale, *run.key, run.lr, run.seed),
                 fields="(task, scale, method, operator, rank, lr, seed)")
    return runs


# ---------------------------------------------------------------- aggregation


def present_metrics(task: str, runs: Iterable[FinetuneRun]) -> tuple[Metric, ...]:
    """The metrics of :data:`COLUMNS` [task] that at least one completed run has, in column order."""
    runs = [r for r in runs if r.status == "completed"]
    return tuple(m for m in COLUMNS.get(task, ()) if any(not math.isnan(r.score(m)) for r in runs))


@dataclass(frozen=True)
class Cell:
    """One arm on one task: the chosen learning rate's completed seeds and their scores."""

    lr: float
    runs: tuple[FinetuneRun, ...]
    stats: dict[Metric, Stat]
    lrs_tried: tuple[float, ...]


def _primary_value(stat: Stat, metric: Metric) -> float:
    """Larger is better; NaN (no value) is worst."""
    if math.isnan(stat.mean):
        return -math.inf
    return stat.mean if metric.higher_is_better else -stat.mean


FINETUNE_SELECTION_RULE = (
    "Each arm's learning rates are scored by the mean primary score of the seeds that ran at every rate of the "
    "arm (seed 0 under `make table1`, which runs each arm's grid at seed 0 and its chosen rate at seeds 1 and 2); "
    "the best wins, ties to the smaller rate; a rate with one of those seeds not completed is not eligible. The "
    "arm reports every completed seed at the chosen rate (best-of-grid on the reported metric, as the paper "
    "reports its Table 5 grids; docs/calibration.md, Amendment 6).")


def select_lr(runs: Sequence[FinetuneRun], metrics: Sequence[Metric]) -> Cell | None:
    """The :class:`Cell` of one arm on one task, by :data:`FINETUNE_SELECTION_RULE`: rates are compared on
    the seeds every rate ran (``metrics[0]``), and the chosen rate reports all its completed seeds."""
    by_lr: dict[float, list[FinetuneRun]] = defaultdict(list)
    for run in runs:
        by_lr[run.lr].append(run)
    if not by_lr or not metrics:
        return None
    grid_seeds = set.intersection(*({r.seed for r in rs} for rs in by_lr.values()))

    def stats(rs: Iterable[FinetuneRun]) -> dict[Metric, Stat]:
        return {m: mean_std(m.show(r.score(m)) for r in rs if not math.isnan(r.score(m))) for m in metrics}

    eligible = {lr: [r for r in rs if r.seed in grid_seeds] for lr, rs in by_lr.items()}
    eligible = {lr: rs for lr, rs in eligible.items() if rs and all(r.status == "completed" for r in rs)}
    if not eligible:
        return None
    scored = {lr: stats(rs) for lr, rs in eligible.items()}
    best = max(sorted(scored), key=lambda lr: (_primary_value(scored[lr][metrics[0]], metrics[0]), -lr))
    reported = sorted((r for r in by_lr[best] if r.status == "completed"), key=lambda r: r.seed)
    return Cell(best, tuple(reported), stats(reported), tuple(sorted(by_lr)))


def cells_by_arm(runs: Sequence[FinetuneRun], task: str) -> dict[ArmKey, Cell]:
    """arm → :class:`Cell` for every arm of ``task`` with a completed learning rate."""
    task_runs = [r for r in runs if r.task == task]
    metrics = present_metrics(task, task_runs)
    by_arm: dict[ArmKey, list[FinetuneRun]] = defaultdict(list)
    for run in task_runs:
        by_arm[run.key].append(run)
    cells = {arm: select_lr(rs, metrics) for arm, rs in by_arm.items()}
    return {arm: cell for arm, cell in cells.items() if cell is not None}


# ---------------------------------------------------------------- rendering


def _fmt(stat: Stat | None, metric: Metric) -> str:
    if stat is None or stat.n == 0:
        return "—"
    return format_stat(stat, 1 if metric.percent else 3)


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def arm_label(key: ArmKey) -> str:
    """A row's method, with its operator when it has one: ``MoRA (rotate)``."""
    return method_label(key, with_operator=True)


def _rank_cell(key: ArmKey, cell: Cell | None) -> str:
    if key.rank is None:
        return "–"
    mapped = cell.runs[0].effective_rank if cell else None
    return f"{key.rank}" + (f" → {mapped}" if mapped is not None and mapped != key.rank else "")


def _limit_note(runs: Iterable[FinetuneRun], metrics: Sequence[Metric]) -> list[str]:
    limits = {(m.lm_eval_task, r.limits.get(m.lm_eval_task)) for r in runs for m in metrics
              if m.lm_eval_task in r.limits}
    limited = sorted({(task, n) for task, n in limits if n is not None})
    return [f"- `{task}` scored on its first {n} test documents (`task.lm_eval_limit`)." for task, n in limited]


def _seed_note(cells: Iterable[Cell]) -> str:
    counts = sorted({len(c.runs) for c in cells})
    return f"Seeds per row: {', '.join(map(str, counts))}; mean ± sample std (n)."


def _mapping_notes(cells: Iterable[Cell]) -> list[str]:
    mappings = sorted({c.runs[0].rank_mapping for c in cells if c.runs[0].rank_mapping})
    return [f"- {m}" for m in mappings]


def _lr_notes(cells: dict[ArmKey, Cell], order: Sequence[ArmKey]) -> str:
    parts = [f"{arm_label(k)}{'' if k.rank is None else f' r{k.rank}'} {cells[k].lr:g}"
             + (f" (of {', '.join(f'{lr:g}' for lr in cells[k].lrs_tried)})" if len(cells[k].lrs_tried) > 1 else "")
             for k in order if k in cells]
    several = any(len(cells[k].lrs_tried) > 1 for k in order if k in cells)
    return "Learning rates: " + "; ".join(parts) + "." + (f" {FINETUNE_SELECTION_RULE}" if several else "")


def table1_arms() -> list[ArmKey]:
    """Table 1's row order: FFT, then each method at r = 8, then at r = 256 (MoRA with its Section 5.2.2 operator)."""
    arms = [ArmKey("fft", None, None)]
    for rank in TABLE1_RANKS:
        arms += [ArmKey(m, TABLE1_OPERATORS.get((m, rank)), rank) for m in TABLE1_METHODS]
    return arms


def table1_markdown(runs: Sequence[FinetuneRun]) -> str:
    """Table 1 as Markdown: one section per task present, our scores (mean ± std over seeds) beside the
    paper's columns for that task."""
    tasks = [t for t in FINETUNE_TASKS if any(r.task == t for r in runs)]
    if not tasks:
        raise ValueError("Table 1 needs fine-tuning runs (task tulu, metamath, biomed or finance); none found")
    scale = "/".join(sorted({r.scale for r in runs}))
    out = [f"## Table 1 — fine-tuning ({scale} scale; ours beside the paper's)", ""]
    for task in tasks:
        cells, metrics = cells_by_arm(runs, task), present_metrics(task, [r for r in runs if r.task == task])
        arms = [a for a in table1_arms() if a in cells]
        if not arms or not metrics:
            out += [f"### {task}: no completed run with lm-eval scores", ""]
            continue
        paper_cols = PAPER_TABLE1_TASK_COLUMNS[task]
        header = (["method", "r"] + [f"ours: {m.label}" for m in metrics]
                  + [f"paper: {PAPER_TABLE1_COLUMNS[i]}" for i in paper_cols])
        out += [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm in arms:
            cell = cells[arm]
            paper = PAPER_TABLE1.get((arm.method, arm.rank))
            out.append("| " + " | ".join([arm_label(arm), _rank_cell(arm, cell)]
                                         + [_fmt(cell.stats.get(m), m) for m in metrics]
                                         + [_paper(paper[i] if paper else None) for i in paper_cols]) + " |")
        missing = [arm_label(a) + ("" if a.rank is None else f" r{a.rank}") for a in table1_arms() if a not in cells]
        task_cells = [cells[a] for a in arms]
        out += ["", _seed_note(task_cells), _lr_notes(cells, arms), *_limit_note(
            (r for c in task_cells for r in c.runs), metrics), *_mapping_notes(task_cells)]
        if missing:
            out.append(f"- Not run: {', '.join(missing)}.")
        out.append("")
    return "\n".join(out)


def table4_markdown(runs: Sequence[FinetuneRun]) -> str:
    """Table 4 as Markdown: MoRA's operators at r = 8 and r = 256 on the math task."""
    math_runs = [r for r in runs if r.task == "metamath" and r.key.method == "mora"]
    cells, metrics = cells_by_arm(math_runs, "metamath"), present_metrics("metamath", math_runs)
    if not cells or not metrics:
        raise ValueError("Table 4 needs completed MoRA runs on task=metamath with lm-eval scores; none found")
    header = ["f_comp, f_decomp", "Eq."] + [f"ours r={rank}: {m.label}" for rank in (8, 256) for m in metrics] \
        + ["paper r=8: GSM8K", "paper r=256: GSM8K"]
    out = [f"## Table 4 — MoRA's compression / decompression operators on GSM8K "
           f"({'/'.join(sorted({r.scale for r in math_runs}))} scale)", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = []
    for operator, (equation, paper8, paper256) in PAPER_TABLE4.items():
        row_cells = [cells.get(ArmKey("mora", operator, rank)) for rank in (8, 256)]
        shown += [c for c in row_cells if c]
        ours = [_fmt(c.stats.get(m) if c else None, m) for c in row_cells for m in metrics]
        out.append("| " + " | ".join([operator, equation, *ours, _paper(paper8), _paper(paper256)]) + " |")
    arms = [ArmKey("mora", op, rank) for op in PAPER_TABLE4 for rank in (8, 256)]
    out += ["", _seed_note(shown), _lr_notes(cells, arms), *_limit_note((r for c in shown for r in c.runs), metrics),
            *_mapping_notes(shown), ""]
    return "\n".join(out)


def _appendix_c_markdown(runs: Sequence[FinetuneRun], task: str, title: str, paper_columns: Sequence[str],
                         paper: dict[tuple[str, int | None], tuple[float, ...]]) -> str:
    task_runs = [r for r in runs if r.task == task]
    cells, metrics = cells_by_arm(task_runs, task), present_metrics(task, task_runs)
    arms = [ArmKey(m, TABLE1_OPERATORS.get((m, rank)), rank) for m, rank in APPENDIX_C_ROWS]
    arms = [a for a in arms if a in cells]
    if not arms or not metrics:
        raise ValueError(f"{title} needs completed runs of task={task} with lm-eval scores; none found")
    header = ["method", "r"] + [f"ours: {m.label}" for m in metrics] + [f"paper: {c}" for c in paper_columns]
    out = [f"## {title} ({'/'.join(sorted({r.scale for r in task_runs}))} scale; ours beside the paper's)", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        cell = cells[arm]
        out.append("| " + " | ".join([arm_label(arm), _rank_cell(arm, cell)] + [_fmt(cell.stats.get(m), m) for m in metrics]
                                     + [_paper(v) for v in paper[arm.method, arm.rank]]) + " |")
    shown = [cells[a] for a in arms]
    out += ["", _seed_note(shown), _lr_notes(cells, arms), *_limit_note((r for c in shown for r in c.runs), metrics),
            *_mapping_notes(shown), ""]
    return "\n".join(out)


def table6_markdown(runs: Sequence[FinetuneRun]) -> str:
    """Table 6 (Appendix C, biomedicine): FFT, LoRA and MoRA at r = 8 and 256."""
    return _appendix_c_markdown(runs, "biomed", "Table 6 — biomedicine", PAPER_TABLE6_COLUMNS, PAPER_TABLE6)


def table7_markdown(runs: Sequence[FinetuneRun]) -> str:
    """Table 7 (Appendix C, finance): FFT, LoRA and MoRA at r = 8 and 256 (paper scale only)."""
    return _appendix_c_markdown(runs, "finance", "Table 7 — finance", PAPER_TABLE7_COLUMNS, PAPER_TABLE7)


def _by_rank_cell(cell: Cell | None, metric: Metric) -> str:
    """``2.256 ± 0.021, lr 0.001`` (three seeds), ``2.337 (1 seed), lr 0.003`` (fewer), ``—`` (not run)."""
    if cell is None or cell.stats.get(metric) is None or cell.stats[metric].n == 0:
        return "—"
    stat, digits = cell.stats[metric], 1 if metric.percent else 3
    value = f"{stat.mean:.{digits}f}" + ("" if math.isnan(stat.std) else f" ± {stat.std:.{digits}f}")
    seeds = "" if stat.n == 3 else f" ({stat.n} seed{'s' if stat.n > 1 else ''})"
    return f"{value}{seeds}, lr {cell.lr:g}"


def by_rank_markdown(runs: Sequence[FinetuneRun], task: str) -> str:
    """One task's Table 1 as the README shows it: a row per method, each metric at r = 8 beside r = 256, every
    cell with the rate :data:`FINETUNE_SELECTION_RULE` chose (mean ± std over 3 seeds, else the seed count)."""
    task_runs = [r for r in runs if r.task == task]
    cells, metrics = cells_by_arm(task_runs, task), present_metrics(task, task_runs)
    if not cells or not metrics:
        raise ValueError(f"no completed {task} run with lm-eval scores")
    header = ["method"] + [f"{m.label.rstrip(' ↑↓')} r = {rank}" for m in metrics for rank in TABLE1_RANKS]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fft = ArmKey("fft", None, None)
    if fft in cells:
        out.append("| " + " | ".join(["FFT (full rank, no r)"] + [
            _by_rank_cell(cells[fft], m) if rank == TABLE1_RANKS[0] else "–" for m in metrics for rank in TABLE1_RANKS])
            + " |")
    for method in TABLE1_METHODS:
        arms = {rank: ArmKey(method, TABLE1_OPERATORS.get((method, rank)), rank) for rank in TABLE1_RANKS}
        if any(arm in cells for arm in arms.values()):
            out.append("| " + " | ".join([method_label(arms[TABLE1_RANKS[0]])] + [
                _by_rank_cell(cells.get(arms[rank]), m) for m in metrics for rank in TABLE1_RANKS]) + " |")
    return "\n".join(out) + "\n"


def table1_by_rank_markdown(runs: Sequence[FinetuneRun]) -> str:
    """:func:`by_rank_markdown` for every task the runs have (the README's fine-tuning tables)."""
    tasks = [t for t in FINETUNE_TASKS if any(r.task == t and r.status == "completed" for r in runs)]
    if not tasks:
        raise ValueError("no completed fine-tuning runs")
    out = ["## Table 1 by rank (each cell at its chosen learning rate)", ""]
    for task in tasks:
        try:
            out += [f"### {task}", "", by_rank_markdown(runs, task)]
        except ValueError as err:
            out += [f"### {task}: {err}", ""]
    return "\n".join(out)


def lr_sweep_markdown(runs: Sequence[FinetuneRun]) -> str:
    """A learning-rate sweep: per task and arm, the primary score of every lr tried (mean ± std (n) over
    completed seeds), the best in bold (any sweep folder, e.g. one of ``make calibrate-finetune`` runs)."""
    out = ["## Fine-tuning learning-rate sweep", ""]
    for task in FINETUNE_TASKS:
        task_runs = [r for r in runs if r.task == task]
        metrics = present_metrics(task, task_runs)
        if not metrics:
            continue
        primary = metrics[0]
        lrs = sorted({r.lr for r in task_runs})
        out += [f"### {task}: {primary.label}", "", "| method | r | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                "|---|---|" + "---|" * len(lrs)]
        by_arm: dict[ArmKey, list[FinetuneRun]] = defaultdict(list)
        for run in task_runs:
            by_arm[run.key].append(run)
        order = {a: i for i, a in enumerate(table1_arms())}
        for arm in sorted(by_arm, key=lambda a: (order.get(a, len(order)), a.method, a.operator or "", a.rank or 0)):
            best = select_lr(by_arm[arm], metrics)
            row = []
            for lr in lrs:
                done = [r for r in by_arm[arm] if r.lr == lr and r.status == "completed"]
                stat = mean_std(primary.show(r.score(primary)) for r in done if not math.isnan(r.score(primary)))
                text = _fmt(stat, primary)
                row.append(f"**{text}**" if best is not None and lr == best.lr and stat.n else text)
            out.append(f"| {arm_label(arm)} | {_rank_cell(arm, None)} | " + " | ".join(row) + " |")
        out.append("")
    if len(out) == 2:
        raise ValueError("no completed fine-tuning runs with lm-eval scores")
    return "\n".join(out)


# The Table 1 bars: one colour per rank, as Fig. 3 colours its ranks; FFT (no rank) grey.
TABLE1_BAR_COLORS: dict[int | None, str] = {None: "0.35", **{r: f"C{i}" for i, r in enumerate(TABLE1_RANKS)}}


def _bar_legend(arm: ArmKey) -> str:
    """``FFT``, or ``r = 8 (MoRA: rotate)``: the arm's rank, with the operator Table 1 runs MoRA with at it."""
    if arm.rank is None:
        return arm_label(arm)
    operators = ", ".join(f"{method_label(ArmKey(m, None, r))}: {op}" for (m, r), op in TABLE1_OPERATORS.items()
                          if r == arm.rank)
    return f"r = {arm.rank}" + (f" ({operators})" if operators else "")


def _draw_table1_bars(ax, cells: dict[ArmKey, Cell], metric: Metric) -> None:
    """One group of bars per method (FFT first), r = 8 left of r = 256; mean ± std over seeds."""
    arms = [a for a in table1_arms() if a in cells]
    methods = list(dict.fromkeys(a.method for a in arms))
    width, shown = 0.4, set()
    for arm in arms:
        offset = 0.0 if arm.rank is None else width * (TABLE1_RANKS.index(arm.rank) - 0.5)
        stat = cells[arm].stats[metric]
        ax.bar(methods.index(arm.method) + offset, stat.mean, width, color=TABLE1_BAR_COLORS[arm.rank],
               yerr=0.0 if math.isnan(stat.std) else stat.std, capsize=3,
               label=None if arm.rank in shown else _bar_legend(arm))
        shown.add(arm.rank)
    ax.set_xticks(range(len(methods)), [method_label(ArmKey(m, None, None)) for m in methods], fontsize=8)
    finite = [cells[a].stats[metric].mean for a in arms if not math.isnan(cells[a].stats[metric].mean)]
    if finite and not metric.percent:  # NLLs differ in the second decimal: zoom onto the bars
        span = max(finite) - min(finite) or 0.1
        ax.set_ylim(min(finite) - 0.5 * span, max(finite) + 0.5 * span)


def plot_table1(runs: Sequence[FinetuneRun], out_path: str | Path | None = None):
    """Table 1 as a grouped bar chart: one panel per task, its primary score (mean ± std over seeds) per
    method, FFT (grey) first, each method's r = 8 (blue) beside its r = 256 (orange). Saves ``<stem>.png``
    and ``.pdf`` when ``out_path`` is given; returns the figure (drawn without pyplot)."""
    from analysis.plotting import new_figure, save_figure  # matplotlib only when a figure is drawn

    cells_by_task = {t: cells_by_arm(runs, t) for t in FINETUNE_TASKS}
    tasks = [t for t in FINETUNE_TASKS if cells_by_task[t]]
    if not tasks:
        raise ValueError("the Table 1 figure needs completed fine-tuning runs with lm-eval scores; none found")
    fig = new_figure(max(6.5, 4.6 * len(tasks)), 4.0)
    for i, task in enumerate(tasks):
        metric = present_metrics(task, [r for r in runs if r.task == task])[0]
        ax = fig.add_subplot(1, len(tasks), i + 1)
        _draw_table1_bars(ax, cells_by_task[task], metric)
        ax.set_ylabel(metric.label)
        ax.set_title(task, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    seeds = sorted({len(c.runs) for t in tasks for c in cells_by_task[t].values()})
    fig.suptitle(f"Table 1 — fine-tuning, each task's primary score ({'/'.join(sorted({r.scale for r in runs}))} "
                 f"scale; mean ± std over {'/'.join(map(str, seeds))} seeds)", fontsize=11)
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


REPORTS = {"table1.md": table1_markdown, "table1_by_rank.md": table1_by_rank_markdown, "table4.md": table4_markdown, "table6.md": table6_markdown,
           "table7.md": table7_markdown}


def write_finetune_report(runs: Sequence[FinetuneRun], out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Write every table the runs support; (paths written, reasons a table was skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, render in REPORTS.items():
        try:
            text = render(runs)
        except ValueError as err:
            skipped.append(f"{name}: {err}")
            continue
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    try:
        plot_table1(runs, out_dir / "table1")
        written += [out_dir / "table1.png", out_dir / "table1.pdf"]
    except ValueError as err:
        skipped.append(f"table1.png: {err}")
    return written, skipped
