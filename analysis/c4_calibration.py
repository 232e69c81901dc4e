"""The C4 calibration rule of docs/calibration.md (Amendment 5) applied to the baselines' runs.

``make calibrate-c4`` trains FFT and LoRA (seed 0) on a ×2 ladder of learning rates at the `mini` preset.
This module reads only those two arms (MoRA, ReLoRA and ReMoRA runs in the same folder are ignored, as the
rule requires) and reports, per run, the final validation perplexity, the over-fitting gap (validation −
training loss), the step of its best evaluation and the fraction of the steps at which it had made 95% of its
final loss decrease (is the run past its first phase?). It then applies the rule mechanically:

- each arm's optimum is the rate with the lowest final validation perplexity; an optimum at an end of the
  rates run asks for the ladder to be extended one ×2 step that way (the report says which rate to add);
- Table 3's grids are three adjacent ×2 points centred on an optimum: FFT's for FFT, LoRA's for every adapter
  arm (LoRA, MoRA, ReLoRA, ReMoRA);
- the over-fitting check: FFT at its optimum must end with a gap ≤ 0.1 nats and its best evaluation last,
  else the step budget is cut to the last evaluation before either happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.c4_diagnosis import EVAL_LOSS
from analysis.pretrain_figures import TASK, PretrainRun, pretrain_run_from_record
from experiments.loop.records import find_runs

BASELINES = ("fft", "lora")
MAX_GAP_NATS = 0.1          # the rule's over-fitting bound (validation − training loss at the end)
CONVERGED_SHARE = 0.95      # "converged": 95% of the final loss decrease made
LADDER_STEP = 2.0


@dataclass(frozen=True)
class CalibrationRun:
    run: PretrainRun
    max_steps: int
    vocab_size: int
    final_train_loss: float
    final_eval_loss: float

    @property
    def method(self) -> str:
        return self.run.run.method

    @property
    def lr(self) -> float:
        return self.run.run.lr

    @property
    def gap(self) -> float:
        return self.final_eval_loss - self.final_train_loss

    @property
    def best_step(self) -> int:
        return min(self.run.perplexity, key=lambda s: (self.run.perplexity[s], s))

    @property
    def converged_fraction(self) -> float:
        """First evaluation at which the validation loss has made 95% of its decrease from ln(vocabulary) (a
        fresh model's loss) to its final value, as a fraction of the steps; NaN with no evaluations."""
        if not self.run.perplexity:
            return math.nan
        curve = {s: math.log(p) for s, p in sorted(self.run.perplexity.items())}
        start, final = math.log(self.vocab_size), curve[max(curve)]
        target = start - CONVERGED_SHARE * (start - final)
        return min(s for s, loss in curve.items() if loss <= target) / self.max_steps


def _calibration_run(record: dict) -> CalibrationRun:
    config, final = record["config"], (record.get("summary") or {}).get("final", {})
    return CalibrationRun(pretrain_run_from_record(record), int(config["train"]["max_steps"]),
                          int(config["task"]["vocab_size"]), float(final.get("loss", math.nan)),
                          float(final.get(EVAL_LOSS, math.nan)))


def load_calibration(root: str | Path, model: str, max_steps: int) -> list[CalibrationRun]:
    """The completed seed-0 FFT and LoRA C4 runs of ``model`` at ``max_steps`` under ``root`` (any depth)."""
    runs = [_calibration_run(r) for r in find_runs(root, **{"task.name": TASK})
            if (r.get("summary") or {}).get("status") == "completed"
            and r["config"]["method"]["name"] in BASELINES and int(r["config"]["seed"]) == 0
            and r["config"]["model"]["name"] == model and int(r["config"]["train"]["max_steps"]) == max_steps]
    if not runs:
        raise ValueError(f"no completed seed-0 FFT or LoRA C4 runs of {model} at {max_steps} steps under {root}")
    return sorted(runs, key=lambda c: (BASELINES.index(c.method), c.lr))


@dataclass(frozen=True)
class ArmChoice:
    method: str
    optimum: CalibrationRun
    rates: tuple[float, ...]

    @property
    def extend_to(self) -> float | None:
        """The ladder rate to add when the optimum sits at an end of the rates run (None: inside)."""
        if self.optimum.lr == min(self.rates):
            return self.optimum.lr / LADDER_STEP
        if self.optimum.lr == max(self.rates):
            return self.optimum.lr * LADDER_STEP
        return None

    @property
    def grid(self) -> tuple[float, float, float]:
        lr = self.optimum.lr
        return (lr / LADDER_STEP, lr, lr * LADDER_STEP)


def choose(runs: Sequence[CalibrationRun]) -> dict[str, ArmChoice]:
    """Each baseline's optimum (lowest final validation perplexity) among the rates it ran."""
    choices = {}
    for method in BASELINES:
        arm = [r for r in runs if r.method == method]
        if arm:
            best = min(arm, key=lambda r: (r.run.final_perplexity, r.lr))
            choices[method] = ArmChoice(method, best, tuple(sorted(r.lr for r in arm)))
    return choices


def overfitting_verdict(fft: CalibrationRun) -> str:
    steps = sorted(fft.run.perplexity)
    if fft.gap <= MAX_GAP_NATS and fft.best_step == steps[-1]:
        return (f"FFT at its optimum ends {fft.gap:+.3f} nats above its training loss (≤ {MAX_GAP_NATS}) with its "
                f"best evaluation last: the step budget stays {fft.max_steps:,}.")
    earlier = [s for s in steps if s <= fft.best_step]
    cut = max(earlier[-1] // 100 * 100, 100)
    reason = (f"gap {fft.gap:+.3f} nats > {MAX_GAP_NATS}" if fft.gap > MAX_GAP_NATS
              else f"best evaluation at step {fft.best_step}, not the last")
    return f"FFT at its optimum over-fits ({reason}): the rule cuts the step budget to {cut:,} and reruns."


def calibration_markdown(runs: Sequence[CalibrationRun], train_tokens: int | None = None,
                         tokens_per_step: int | None = None) -> str:
    steps = sorted({s for c in runs for s in c.run.perplexity})
    lines = ["# C4 `mini` calibration (FFT and LoRA only, seed 0; docs/calibration.md, Amendment 5)", "",
             "Validation perplexity (lower is better) at the end and at each evaluation; the training loss is the "
             "mean of the last logging window; 'converged at' is the first evaluation with 95% of the final loss "
             "decrease from ln(vocabulary), as a fraction of the steps.", ""]
    if train_tokens and tokens_per_step:
        epochs = runs[0].max_steps * tokens_per_step / train_tokens
        lines += [f"{runs[0].max_steps:,} steps × {tokens_per_step:,} tokens = {epochs:.2f} epochs of the "
                  f"{train_tokens:,}-token training split.", ""]
    lines += ["| arm | lr | final val. perplexity | final train loss | val. − train loss | best eval. step | "
              "converged at | " + " | ".join(f"ppl @ {s}" for s in steps) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(steps)]
    for c in runs:
        curve = [f"{c.run.perplexity[s]:.1f}" if s in c.run.perplexity else "" for s in steps]
        lines.append(f"| {c.method.upper() if c.method == 'fft' else 'LoRA'} | {c.lr:g} | "
                     f"{c.run.final_perplexity:.1f} | {c.final_train_loss:.3f} | {c.gap:+.3f} | {c.best_step} | "
                     f"{c.converged_fraction:.0%} | " + " | ".join(curve) + " |")
    choices = choose(runs)
    lines += ["", "**The rule applied.**", ""]
    for method, choice in choices.items():
        name = "FFT" if method == "fft" else "LoRA"
        rates = ", ".join(f"{lr:g}" for lr in choice.rates)
        if choice.extend_to is not None:
            lines.append(f"- {name}: optimum {choice.optimum.lr:g} is at an end of the rates run ({rates}): "
                         f"extend the ladder to {choice.extend_to:g} (`make calibrate-c4-{method} "
                         f"CAL_C4_LR={choice.extend_to:g}`) before "
                         "choosing a grid.")
            continue
        arms = "FFT" if method == "fft" else "LoRA, MoRA, ReLoRA and ReMoRA (one adapter grid)"
        grid = ", ".join(f"{lr:g}" for lr in choice.grid)
        lines.append(f"- {name}: optimum {choice.optimum.lr:g} (inside {rates}; final perplexity "
                     f"{choice.optimum.run.final_perplexity:.1f}) → Table 3 grid {{{grid}}} for {arms}.")
    if "fft" in choices:
        lines.append(f"- Over-fitting check: {overfitting_verdict(choices['fft'].optimum)}")
    return "\n".join(lines) + "\n"


def write_calibration_report(root: str | Path, out: str | Path) -> Path:
    """Apply the rule to the runs of the current `mini` C4 preset under ``root``; write c4_calibration.md."""
    from analysis.regime import c4_run, c4_train_tokens

    preset = c4_run("mini", "fft")
    runs = load_calibration(root, preset.model.name, preset.train.max_steps)
    tokens_per_step = preset.train.batch_size * preset.train.grad_accum * preset.task.seq_len
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "c4_calibration.md"
    path.write_text(calibration_markdown(runs, c4_train_tokens(), tokens_per_step),
                    encoding="utf-8")
    return path
