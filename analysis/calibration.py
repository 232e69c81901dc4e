"""UUID calibration runs → the rule of docs/calibration.md applied → the number of pairs selected.

The rule (written before the runs): the mini preset must show the paper's Table 2 shape for the
baselines, at each baseline's best learning rate (Table 2's own rule, :data:`analysis.runs.SELECTION_RULE`):
FFT at 100% character accuracy by the evaluation standing for step 500, LoRA r = 256 by the one
standing for step 700, LoRA r = 8 below 100% at the last. The selection is the largest number of pairs
for which the shape holds. Only FFT and LoRA runs are read: MoRA never enters the calibration.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from analysis.runs import SELECTION_RULE, Run, Selection, aggregate_curves, check_unique, run_from_record, \
    select_learning_rates
from experiments.loop.records import find_runs

PAPER_EVAL_STEPS = (300, 500, 700, 900)  # Table 2's evaluations; the mini ones stand for them in order
# The mini evaluation steps are read from each run's config (``train.eval_steps``): the k-th of them stands
# for the paper's k-th (round 1: 75/150/225/300; Amendment 1: 100/167/233/300). Runs written without
# that key (synthetic ones) fall back to the steps their log evaluated, in order.
FULL = 100.0  # character accuracy, percent


class Arm(NamedTuple):
    """A baseline of the calibration and its condition: ``deadline`` is the paper step by which it must
    reach 100% (None: it must stay below 100% at the last evaluation)."""

    method: str
    rank: int | None
    deadline: int | None

    @property
    def label(self) -> str:
        return "FFT" if self.rank is None else f"LoRA r = {self.rank}"

    @property
    def condition(self) -> str:
        return f"100% by step {self.deadline}" if self.deadline else "below 100% at the end"


ARMS = (Arm("fft", None, 500), Arm("lora", 256, 700), Arm("lora", 8, None))


@dataclass(frozen=True)
class ArmResult:
    """One arm at one number of pairs: the learning-rate selection and what the best rate's runs show."""

    arm: Arm
    n_pairs: int
    batch_size: int
    selection: Selection
    accuracy: dict[int, float]  # mini step → mean character accuracy (%) of the best rate's runs
    eval_steps: tuple[int, ...] = ()  # the runs' configured evaluation steps (empty: those evaluated)

    @property
    def grid(self) -> tuple[float, ...]:
        return tuple(c.lr for c in self.selection.candidates)

    @property
    def best_lr(self) -> float | None:
        return self.selection.chosen.lr if self.selection.chosen else None

    @property
    def inside_grid(self) -> bool:
        """The best rate is neither end of a grid of at least three rates."""
        return len(self.grid) >= 3 and self.best_lr is not None and self.grid[0] < self.best_lr < self.grid[-1]

    @property
    def first_full_step(self) -> int | None:
        """The first evaluated mini step at 100% character accuracy (None: never)."""
        return next((step for step in sorted(self.accuracy) if self.accuracy[step] >= FULL), None)

    def paper_step(self, mini_step: int) -> int | None:
        """The paper step the ``mini_step`` evaluation stands for (by position), None beyond Table 2's."""
        return paper_steps(self.eval_steps or sorted(self.accuracy)).get(mini_step)

    @property
    def holds(self) -> bool:
        """Whether this arm meets its condition of the paper's shape."""
        if not self.accuracy:
            return False
        if self.arm.deadline is None:
            return self.accuracy[max(self.accuracy)] < FULL
        first = self.first_full_step
        paper = self.paper_step(first) if first is not None else None
        return paper is not None and paper <= self.arm.deadline


@dataclass(frozen=True)
class PairsResult:
    """Every arm at one number of pairs; the shape holds when every arm is there and meets its condition."""

    n_pairs: int
    arms: tuple[ArmResult, ...]

    @property
    def complete(self) -> bool:
        return {a.arm for a in self.arms} == set(ARMS)

    @property
    def shape_holds(self) -> bool:
        return self.complete and all(a.holds for a in self.arms)

    @property
    def inside_grids(self) -> bool:
        return all(a.inside_grid for a in self.arms)


def paper_steps(mini_steps: Sequence[int]) -> dict[int, int]:
    """Mini evaluation step → the paper step it stands for, by position (k-th → Table 2's k-th)."""
    return dict(zip(sorted(mini_steps), PAPER_EVAL_STEPS))


def load_calibration(root: str | Path) -> list[PairsResult]:
    """The UUID runs under ``root`` grouped by number of pairs, FFT and LoRA arms only, by increasing N."""
    by_pairs: dict[int, list[tuple[Run, tuple[int, tuple[int, ...]]]]] = defaultdict(list)
    for record in find_runs(root, **{"task.name": "uuid"}):
        run = run_from_record(record)
        if any((run.method, run.rank) == (a.method, a.rank) for a in ARMS):
            config = record["config"]
            evals = tuple(sorted(int(s) for s in config["train"].get("eval_steps") or ()))
            by_pairs[int(config["task"]["n_pairs"])].append((run, (int(config["train"]["batch_size"]), evals)))
    results = []
    for n_pairs in sorted(by_pairs):
        check_unique([run for run, _ in by_pairs[n_pairs]])
        results.append(PairsResult(n_pairs, tuple(_arm_result(arm, n_pairs, by_pairs[n_pairs]) for arm in ARMS
                                                  if any(_is(run, arm) for run, _ in by_pairs[n_pairs]))))
    return results


def _is(run: Run, arm: Arm) -> bool:
    return (run.method, run.rank) == (arm.method, arm.rank)


def _arm_result(arm: Arm, n_pairs: int, runs: Sequence[tuple[Run, tuple[int, tuple[int, ...]]]]) -> ArmResult:
    mine = [(run, setting) for run, setting in runs if _is(run, arm)]
    batches = sorted({batch for _, (batch, _) in mine})
    if len(batches) > 1:
        raise ValueError(f"{arm.label} at {n_pairs} pairs was run with several batch sizes {batches}; "
                         "the rule keeps one batch per number of pairs")
    evals = sorted({steps for _, (_, steps) in mine})
    if len(evals) > 1:
        raise ValueError(f"{arm.label} at {n_pairs} pairs was run with several evaluation schedules {evals}; "
                         "the rule keeps one per round")
    (selection,) = select_learning_rates([run for run, _ in mine])
    curves = aggregate_curves(run.char_accuracy for run in selection.chosen.runs) if selection.chosen else {}
    return ArmResult(arm, n_pairs, batches[0], selection, {step: stat.mean for step, stat in curves.items()},
                     evals[0])


def selected_pairs(results: Sequence[PairsResult]) -> int | None:
    """The rule's selection: the largest number of pairs at which the shape holds (None if none)."""
    passing = [r.n_pairs for r in results if r.shape_holds]
    return max(passing) if passing else None


# ---------------------------------------------------------------- reporting


def _lr(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _row(a: ArmResult, steps: Sequence[int]) -> str:
    accuracy = " | ".join(f"{a.accuracy[s]:.1f}" if s in a.accuracy else "—" for s in steps)
    first = a.first_full_step
    first_text = "never" if first is None else f"{first} (paper {a.paper_step(first)})"
    grid = "{" + ", ".join(_lr(lr) for lr in a.grid) + "}"
    inside = "yes" if a.inside_grid else "**no: at an end**"
    return (f"| {a.n_pairs} | {a.batch_size} | {a.arm.label} | {grid} | {_lr(a.best_lr)} | {inside} | {accuracy} | "
            f"{first_text} | {a.arm.condition}: {'✓' if a.holds else '✗'} |")


def calibration_markdown(results: Sequence[PairsResult]) -> str:
    """The calibration table, the verdict per number of pairs and the selection."""
    steps = sorted({s for r in results for a in r.arms for s in a.accuracy})
    configured = {a.eval_steps for r in results for a in r.arms if a.eval_steps}
    if len(configured) > 1:
        raise ValueError(f"the runs mix evaluation schedules {sorted(configured)}; report one round at a time")
    paper = paper_steps(configured.pop() if configured else steps)
    header = " | ".join(f"acc. % @ {s}" + (f" (paper {paper[s]})" if s in paper else "") for s in steps)
    lines = ["### Calibration runs (FFT and LoRA only, seed 0)", "",
             f"Best learning rate per arm: {SELECTION_RULE}", "",
             f"| pairs | batch | arm | lr grid | best lr | best inside the grid? | {header} | first eval at 100% | "
             "condition |", "|" + "---|" * (9 + len(steps) - 1)]
    lines += [_row(a, steps) for r in results for a in r.arms]
    lines += ["", "| pairs | every arm run? | every optimum inside its grid? | the paper's shape holds? |",
              "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.n_pairs} | {'yes' if r.complete else 'no'} | {'yes' if r.inside_grids else 'no'} | "
                     f"{'✓' if r.shape_holds else '✗'} |")
    chosen = selected_pairs(results)
    lines += ["", _selection_text(chosen, results)]
    return "\n".join(lines) + "\n"


def _selection_text(chosen: int | None, results: Sequence[PairsResult]) -> str:
    if chosen is None:
        return "**Selection: none** — the shape holds at no number of pairs tried."
    result = next(r for r in results if r.n_pairs == chosen)
    batch = result.arms[0].batch_size
    note = "" if result.inside_grids else (" Provisional: an arm's best learning rate is at an end of its grid "
                                           "(the rule extends that grid before the selection is final).")
    return f"**Selection: {chosen} pairs** (batch {batch}), the largest number of pairs at which the shape holds.{note}"


def write_calibration_report(root: str | Path, out: str | Path) -> Path:
    """Write ``<out>/calibration_uuid.md``; raises ValueError if ``root`` holds no FFT or LoRA UUID run."""
    results = load_calibration(root)
    if not results:
        raise ValueError(f"no FFT or LoRA UUID run folders under {root}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration_uuid.md"
    path.write_text(calibration_markdown(results))
    return path
