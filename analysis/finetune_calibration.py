"""The fine-tuning calibration rule of docs/calibration.md (Amendment 6) applied to the baselines' runs.

``make calibrate-finetune`` trains FFT (r = 8 experiment) and LoRA at r = 8 and r = 256, seed 0, per task, on
the ladder {1, 3} × 10^k at the current `mini` preset. This module reads only those two methods (every other
arm in the same folder is ignored, as the rule requires) and applies the rule mechanically:

- each baseline's optimum is the rate with the best primary score (the task's first reported column,
  :data:`analysis.finetune_tables.COLUMNS`); an optimum at an end of the rates run asks for the ladder to grow
  one step that way (the report names the rate to add);
- each Table 1 arm's grid is three adjacent ladder points centred on the ladder point nearest (in log) to
  LoRA's optimum at the same rank × :data:`TABLE5_RATIO` (FFT: its own optimum);
- reported beside it: the base's in-loop held-out score at step 0 (before any update) and whether an arm's
  held-out score was better at an earlier evaluation than at the end (over-fitting).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.finetune_tables import FinetuneRun, Metric, finetune_run_from_record, present_metrics, select_lr
from experiments.loop.records import find_runs

BASELINES = ("fft", "lora")
RANKS = (8, 256)
TABLE1_ADAPTERS = ("lora", "loraplus", "asylora", "relora", "dora", "mora")
# Table 5's rate for an arm over its LoRA-like rate at the same rank and task (midpoints of the paper's two-value
# grids): MoRA r = 8 {2e-4, 3e-4} vs {1e-4, 2e-4}, r = 256 {3e-5, 5e-5} vs {1e-4, 2e-4} on Tülu and MetaMath;
# {4e-4, 5e-4} and {5e-5, 7e-5} vs {3e-4, 4e-4} on biomedicine (and finance). LoRA+, AsyLoRA, ReLoRA and DoRA
# are "LoRA-like" in Table 5: ratio 1.
_MORA_RATIO = {("tulu", 8): 2.5e-4 / 1.5e-4, ("tulu", 256): 4e-5 / 1.5e-4,
               ("metamath", 8): 2.5e-4 / 1.5e-4, ("metamath", 256): 4e-5 / 1.5e-4,
               ("biomed", 8): 4.5e-4 / 3.5e-4, ("biomed", 256): 6e-5 / 3.5e-4,
               ("finance", 8): 4.5e-4 / 3.5e-4, ("finance", 256): 6e-5 / 3.5e-4}


def table5_ratio(task: str, rank: int, method: str) -> float:
    """Table 5's rate of ``method`` over its LoRA-like rate at ``rank`` on ``task``."""
    return _MORA_RATIO[task, rank] if method == "mora" else 1.0


# ---------------------------------------------------------------- the ladder {1, 3} x 10^k


def ladder_index(lr: float) -> int:
    """Position of the ladder point nearest ``lr`` in log (1e-3 → -6, 3e-3 → -5, 1e-2 → -4, …)."""
    decade = math.floor(math.log10(lr))
    points = [(2 * k + (m == 3), m * 10.0 ** k) for k in (decade - 1, decade, decade + 1) for m in (1, 3)]
    return min(points, key=lambda p: (abs(math.log10(p[1] / lr)), p[1]))[0]


def ladder_value(index: int) -> float:
    """The ladder point at ``index`` (inverse of :func:`ladder_index`), rounded to its printed value."""
    return float(f"{(3 if index % 2 else 1) * 10.0 ** (index // 2):.0e}")


def ladder_grid(centre: float) -> tuple[float, float, float]:
    """Three adjacent ladder points around the point nearest ``centre``."""
    i = ladder_index(centre)
    return ladder_value(i - 1), ladder_value(i), ladder_value(i + 1)


# ---------------------------------------------------------------- runs and optima


@dataclass(frozen=True)
class CalibrationArm:
    """One baseline (FFT, or LoRA at one rank) on one task: its seed-0 runs by learning rate."""

    task: str
    method: str
    rank: int | None
    metric: Metric
    runs: dict[float, FinetuneRun]
    curves: dict[float, dict[int, float]]   # lr → {step: in-loop held-out score}, step 0 = the base

    def score(self, lr: float) -> float:
        return self.runs[lr].score(self.metric)

    @property
    def optimum(self) -> float:
        sign = -1.0 if self.metric.higher_is_better else 1.0
        return min(self.runs, key=lambda lr: (sign * self.score(lr) if not math.isnan(self.score(lr)) else math.inf,
                                              lr))

    @property
    def extend_to(self) -> float | None:
        """The ladder point to add when the optimum sits at an end of the rates run (None: inside)."""
        i = ladder_index(self.optimum)
        if self.optimum == min(self.runs):
            return ladder_value(i - 1)
        if self.optimum == max(self.runs):
            return ladder_value(i + 1)
        return None

    def overfits(self, lr: float) -> bool:
        """The in-loop held-out score (lower is better) was better at an earlier evaluation after step 0."""
        curve = {s: v for s, v in self.curves.get(lr, {}).items() if s > 0}
        return bool(curve) and min(curve.values()) < curve[max(curve)] - 1e-9


def _in_loop_key(metrics_rows: Sequence[dict]) -> str | None:
    keys = {k for row in metrics_rows for k in row}
    for key in ("eval/response_nll", "eval/loss"):
        if key in keys:
            return key
    return None


def _curve(record: dict) -> dict[int, float]:
    key = _in_loop_key(record["metrics"])
    return {} if key is None else {int(r["step"]): float(r[key]) for r in record["metrics"] if key in r}


def _preset_matches(config: dict, preset) -> bool:
    """The run used the current preset's data and step budget (older miniatures' runs are not read)."""
    train, task = config["train"], config["task"]
    return (int(train["max_steps"]) == preset.train.max_steps and int(train["batch_size"]) == preset.train.batch_size
            and task.get("n_train") == preset.task.n_train)


def load_calibration(root: str | Path, tasks: Sequence[str], presets: dict) -> dict[tuple[str, str, int | None],
                                                                                    CalibrationArm]:
    """(task, method, rank) → :class:`CalibrationArm` of the completed seed-0 FFT and LoRA runs of the current
    `mini` presets (``presets``: task → composed run spec) under ``root``."""
    by_arm: dict[tuple[str, str, int | None], list[tuple[FinetuneRun, dict]]] = defaultdict(list)
    for record in find_runs(root, **{"scale.name": "mini"}):
        config = record["config"]
        task = (config.get("task") or {}).get("name")
        if task not in tasks or config["method"]["name"] not in BASELINES or int(config["seed"]) != 0:
            continue
        if (record.get("summary") or {}).get("status") != "completed" or not _preset_matches(config, presets[task]):
            continue
        run = finetune_run_from_record(record)
        if run.key.method == "lora" and run.key.rank not in RANKS:
            continue
        by_arm[task, run.key.method, run.key.rank].append((run, record))
    arms = {}
    for (task, method, rank), pairs in by_arm.items():
        metric = present_metrics(task, [run for run, _ in pairs])[0]
        arms[task, method, rank] = CalibrationArm(task, method, rank, metric, {run.lr: run for run, _ in pairs},
                                                  {run.lr: _curve(record) for run, record in pairs})
    if not arms:
        raise ValueError(f"no completed seed-0 FFT or LoRA runs of the current mini fine-tuning presets "
                         f"({', '.join(tasks)}) under {root}")
    return arms


def derived_grids(arms: dict[tuple[str, str, int | None], CalibrationArm],
                  task: str) -> dict[str, dict[str, list[float]]]:
    """``lr_grid`` of ``task`` as the rule gives it: {"r8": {method: grid}, "r256": {...}}; an arm whose
    baseline optimum is not yet inside its ladder is left out."""
    grids: dict[str, dict[str, list[float]]] = {f"r{rank}": {} for rank in RANKS}
    fft = arms.get((task, "fft", None))
    if fft is not None and fft.extend_to is None:
        grids["r8"]["fft"] = list(ladder_grid(fft.optimum))
    for rank in RANKS:
        lora = arms.get((task, "lora", rank))
        if lora is None or lora.extend_to is not None:
            continue
        for method in TABLE1_ADAPTERS:
            grids[f"r{rank}"][method] = list(ladder_grid(lora.optimum * table5_ratio(task, rank, method)))
    return grids


# ---------------------------------------------------------------- report


def _arm_label(arm: CalibrationArm) -> str:
    return "FFT" if arm.method == "fft" else f"LoRA r = {arm.rank}"


def calibration_markdown(arms: dict[tuple[str, str, int | None], CalibrationArm], tasks: Sequence[str],
                         epochs: dict[str, str] | None = None) -> str:
    lines = ["# Fine-tuning `mini` calibration (FFT and LoRA only, seed 0; docs/calibration.md, Amendment 6)", "",
             "Per task: the primary score after training (the column Table 1 reports) for every rate run, the in-loop "
             "held-out score (response NLL, or the held-out text's loss for biomedicine; lower is better) before "
             "training (step 0, the base), at the middle evaluation and at the end, and whether it was better "
             "before the end (over-fitting).", ""]
    for task in tasks:
        task_arms = [a for key, a in sorted(arms.items(), key=lambda kv: (kv[0][1] != "fft", kv[0][2] or 0))
                     if key[0] == task]
        if not task_arms:
            continue
        lines += [f"#### {task}", ""]
        if epochs and task in epochs:
            lines += [epochs[task], ""]
        steps = sorted({s for a in task_arms for c in a.curves.values() for s in c})
        lines += ["| arm | lr | " + task_arms[0].metric.label + " | " + " | ".join(f"held-out @ {s}" for s in steps)
                  + " | over-fits |", "|---|---|---|" + "---|" * len(steps) + "---|"]
        for arm in task_arms:
            for lr in sorted(arm.runs):
                curve = arm.curves.get(lr, {})
                cells = [f"{curve[s]:.3f}" if s in curve else "" for s in steps]
                score = f"**{arm.score(lr):.3f}**" if lr == arm.optimum else f"{arm.score(lr):.3f}"
                lines.append(f"| {_arm_label(arm)} | {lr:g} | {score} | " + " | ".join(cells)
                             + f" | {'yes' if arm.overfits(lr) else 'no'} |")
        lines += ["", "**The rule applied.**", ""]
        for arm in task_arms:
            rates = ", ".join(f"{lr:g}" for lr in sorted(arm.runs))
            if arm.extend_to is not None:
                lines.append(f"- {_arm_label(arm)}: optimum {arm.optimum:g} is at an end of the rates run ({rates}): "
                             f"extend the ladder to {arm.extend_to:g} before choosing a grid.")
            else:
                lines.append(f"- {_arm_label(arm)}: optimum {arm.optimum:g} (inside {rates}).")
        for rank_key, grid in derived_grids(arms, task).items():
            if grid:
                parts = ", ".join(f"{m} {{{', '.join(f'{lr:g}' for lr in g)}}}" for m, g in grid.items())
                lines.append(f"- Table 1 grids at paper {rank_key.replace('r', 'r = ')}: {parts}.")
        lines.append("")
    return "\n".join(lines)


def preset_specs(tasks: Sequence[str]) -> dict:
    """task → the composed `mini` run spec of ``experiment=finetune_r8 task=<task>``."""
    from analysis.regime import run_config

    return {task: run_config("experiment=finetune_r8", f"task={task}") for task in tasks}


def write_calibration_report(root: str | Path, out: str | Path, tasks: Sequence[str] = ("metamath", "tulu", "biomed"),
                             ) -> Path:
    """Apply the rule to the current presets' runs under ``root``; write finetune_calibration.md."""
    presets = preset_specs(tasks)
    arms = load_calibration(root, tasks, presets)
    epochs = {}
    for task, spec in presets.items():
        what = f"the first {spec.task.n_train:,} items" if spec.task.n_train else "every item"
        epochs[task] = (f"{spec.train.max_steps} steps × {spec.train.batch_size} examples per step over {what} of "
                        f"the training set; {spec.train.scheduler} schedule, {spec.train.warmup_steps} warm-up steps.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "finetune_calibration.md"
    path.write_text(calibration_markdown(arms, tasks, epochs), encoding="utf-8")
    return path


def finetune_best_lrs(root: str | Path, task: str, where: dict) -> dict[tuple[str, int | None], list[float]]:
    """The rates :data:`analysis.finetune_tables.FINETUNE_SELECTION_RULE` chooses among the current `mini` preset's
    runs of ``task`` under ``root`` (``where``: dotted config filters), per (method, paper rank): one rate per
    operator of that arm, so a list longer than one asks for a ``method.operator`` filter."""
    preset = preset_specs([task])[task]
    runs = [finetune_run_from_record(r) for r in find_runs(root, **{"task.name": task, "scale.name": "mini"}, **where)
            if _preset_matches(r["config"], preset)]
    metrics = present_metrics(task, runs)
    chosen: dict[tuple[str, int | None], list[float]] = defaultdict(list)
    for key in {r.key for r in runs}:
        cell = select_lr([r for r in runs if r.key == key], metrics)
        if cell is not None:
            chosen[key.method, key.rank].append(cell.lr)
    return chosen
