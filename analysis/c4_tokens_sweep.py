"""C4 pretraining as the number of training tokens per parameter grows (issue 12, item 4; beyond the paper).

Table 3 is measured at 7 tokens per parameter where the paper trains on 21 (README regime table), and tokens
per parameter is the C4 axis furthest from the paper's that a CPU can move. So FFT, LoRA and MoRA are run at
several step budgets S, each at its Table 3 learning rate, with every other setting scaled with S as the preset
scales it (docs/calibration.md, Amendment 7, written before the runs), and reported per S: final validation
perplexity of each arm, the MoRA − LoRA and MoRA − FFT gaps paired by seed (seed s of both arms starts from the
same W₀ and sees the same batches), and FFT's validation − training loss, since the fixed 970-document corpus
is repeated more as S grows. A reader sees whether MoRA's distance to LoRA closes as training approaches the
paper's tokens per parameter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.methods import method_style
from analysis.plotting import new_figure, save_figure
from analysis.pretrain_figures import TASK, PretrainGroup, group_pretrain_runs, pretrain_run_from_record
from analysis.runs import Stat, check_unique, mean_std
from experiments.loop.records import find_runs

ARMS = ("fft", "lora", "mora")
OVERFIT_NATS = 0.1   # Amendment 5's over-fitting check: validation − training loss above this


@dataclass(frozen=True)
class Budget:
    """One step budget's arms, each reduced to its learning rate by Table 3's rule."""

    steps: int
    tokens: int                 # trained tokens: steps × sequences per step × sequence length
    groups: dict[str, PretrainGroup]

    def tokens_per_parameter(self, parameters: int) -> float:
        return self.tokens / parameters


def _tokens(config: dict) -> int:
    train, task = config["train"], config["task"]
    return int(train["max_steps"]) * int(train["batch_size"]) * int(train.get("grad_accum", 1)) * int(task["seq_len"])


def load_budgets(roots: Sequence[str | Path]) -> list[Budget]:
    """The `mini` FFT, LoRA and MoRA C4 runs under ``roots``, grouped by step budget (from each run's
    config), by increasing budget; within one budget each arm keeps the rate Table 3's rule chooses."""
    by_steps: dict[int, list] = defaultdict(list)
    tokens: dict[int, set[int]] = defaultdict(set)
    models: set[str] = set()
    for root in roots:
        for record in find_runs(root, **{"task.name": TASK, "scale.name": "mini"}):
            run = pretrain_run_from_record(record)
            if run.run.method not in ARMS:
                continue
            steps = int(record["config"]["train"]["max_steps"])
            by_steps[steps].append(run)
            tokens[steps].add(_tokens(record["config"]))
            models.add(run.model)
    if len(models) > 1:
        raise ValueError(f"the sweep's runs use several models {sorted(models)}; it compares one model's budgets")
    budgets = []
    for steps in sorted(by_steps):
        if len(tokens[steps]) > 1:
            raise ValueError(f"the runs of {steps} steps trained on several token counts {sorted(tokens[steps])}; "
                             "the sweep varies the steps only")
        check_unique(by_steps[steps], lambda r: (*r.key, r.run.lr, r.run.seed),
                     f"(method, operator, rank, lr, seed) at {steps} steps")
        groups = {key.method: group for key, group in group_pretrain_runs(by_steps[steps]).items()}
        budgets.append(Budget(steps, tokens[steps].pop(), groups))
    return budgets


def paired_gap(first: PretrainGroup, second: PretrainGroup) -> Stat | None:
    """Final perplexity of ``first`` minus ``second``, seed by seed (the seeds both have), mean ± std."""
    second_by_seed = {run.run.seed: run.final_perplexity for run in second.runs}
    diffs = [run.final_perplexity - second_by_seed[run.run.seed] for run in first.runs
             if run.run.seed in second_by_seed and not math.isnan(run.final_perplexity)
             and not math.isnan(second_by_seed[run.run.seed])]
    return mean_std(diffs) if diffs else None


def generalisation_gap(group: PretrainGroup) -> Stat:
    """Validation loss (ln perplexity) − training loss (the last logged step), per seed, mean ± std."""
    return mean_std(math.log(run.final_perplexity) - run.run.final_loss for run in group.runs
                    if not math.isnan(run.final_perplexity) and not math.isnan(run.run.final_loss))


def _stat(stat: Stat, sign: str = "") -> str:
    """``mean ± std`` to one decimal (``sign="+"``: the mean signed, for gaps); the ± part dropped for one value."""
    return f"{stat.mean:{sign}.1f}" + ("" if math.isnan(stat.std) else f" ± {stat.std:.1f}")


def _cell(group: PretrainGroup | None) -> str:
    return f"{_stat(group.perplexity)} (lr {group.lr:g})" if group else "–"


def _gap(first: PretrainGroup | None, second: PretrainGroup | None) -> str:
    gap = paired_gap(first, second) if first and second else None
    return _stat(gap, "+") if gap else "–"


def sweep_markdown(budgets: Sequence[Budget], parameters: int, epoch_tokens: int) -> str:
    """One row per step budget: tokens per parameter, epochs, each arm's perplexity, the paired gaps and
    FFT's over-fitting check. ``parameters``: the model's parameter count; ``epoch_tokens``: one pass."""
    if not budgets:
        raise ValueError("no C4 runs of FFT, LoRA or MoRA found for the tokens-per-parameter sweep")
    lines = ["| steps | tokens per parameter | epochs | FFT | LoRA | MoRA | MoRA − LoRA | MoRA − FFT | "
             "FFT val. − train loss (nats) | seeds (FFT/LoRA/MoRA) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        fft, lora, mora = (budget.groups.get(arm) for arm in ARMS)
        overfit = "–"
        if fft:
            stat = generalisation_gap(fft)
            overfit = f"{stat.mean:+.3f}" + (" (over 0.1)" if stat.mean > OVERFIT_NATS else "")
        seeds = "/".join(str(len(g.runs)) if g else "0" for g in (fft, lora, mora))
        lines.append(f"| {budget.steps:,} | {budget.tokens_per_parameter(parameters):.1f} | "
                     f"{budget.tokens / epoch_tokens:.2f} | {_cell(fft)} | {_cell(lora)} | {_cell(mora)} | "
                     f"{_gap(mora, lora)} | {_gap(mora, fft)} | {overfit} | {seeds} |")
    return "\n".join(lines)


def plot_budgets(budgets: Sequence[Budget], parameters: int, out_path: str | Path | None = None):
    """Left: final validation perplexity against tokens per parameter; right: the paired gaps."""
    if not budgets:
        raise ValueError("no C4 runs of FFT, LoRA or MoRA found for the tokens-per-parameter sweep")
    fig = new_figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    for arm in ARMS:
        points = [(b.tokens_per_parameter(parameters), b.groups[arm].perplexity) for b in budgets if arm in b.groups]
        if points:
            style = method_style(arm)
            left.errorbar([x for x, _ in points], [s.mean for _, s in points],
                          yerr=[0 if s.n < 2 else s.std for _, s in points], color=style.color,
                          linestyle=style.linestyle, marker="o", markersize=3, capsize=2, label=style.label)
    for (first, second), marker in ((("mora", "lora"), "o"), (("mora", "fft"), "s")):
        points = [(b.tokens_per_parameter(parameters), paired_gap(b.groups[first], b.groups[second]))
                  for b in budgets if first in b.groups and second in b.groups]
        points = [(x, s) for x, s in points if s is not None]
        if points:
            right.errorbar([x for x, _ in points], [s.mean for _, s in points],
                           yerr=[0 if s.n < 2 else s.std for _, s in points], marker=marker, markersize=3,
                           capsize=2, color=method_style(second).color,
                           label=f"MoRA − {method_style(second).label}")
    right.axhline(0.0, color="grey", linewidth=0.8)
    for ax, label in ((left, "validation perplexity"), (right, "perplexity difference (paired by seed)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens per parameter")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("C4 pretraining vs tokens per parameter (mini; mean ± std over seeds, Table 3 rate per arm)")
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def model_size() -> tuple[int, int]:
    """(parameters of the `mini` C4 model, tokens in one pass of its training split), from the preset."""
    from analysis.regime import base_model, c4_run, c4_train_tokens, parameter_count

    return parameter_count(base_model(c4_run("mini", "fft"))), c4_train_tokens()


def write_sweep_report(roots: Sequence[str | Path], out: str | Path) -> list[Path]:
    """``c4_tokens_sweep.md`` and ``c4_tokens_sweep.{png,pdf}`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = load_budgets(roots)
    parameters, epoch_tokens = model_size()
    table = out / "c4_tokens_sweep.md"
    table.write_text("# C4 pretraining vs tokens per parameter\n\nFinal validation perplexity, mean ± std over "
                     "seeds, each arm at its Table 3 rate; gaps paired by seed. Protocol: docs/calibration.md, "
                     "Amendment 7.\n\n" + sweep_markdown(budgets, parameters, epoch_tokens) + "\n", encoding="utf-8")
    return [table, *save_figure(plot_budgets(budgets, parameters), out / "c4_tokens_sweep")]
