"""Why does LoRA end below FFT in `mini` C4 pretraining? The measurement of docs/calibration.md.

``make c4-diagnosis`` runs the baselines (FFT, LoRA r = 128; seed 0) under three changes, each in its own
folder below ``results/c4_diagnosis/``: a finer FFT learning-rate grid, 4× the training steps, and LoRA with
its embeddings, norms and head frozen. This module puts every run in one table: its setting (method, lr,
steps, what besides the adapters is trained), the epochs it saw, its final validation perplexity and
training loss, the validation − training loss gap (overfitting), and the perplexity at each evaluation.
Nothing is selected here; the table is the evidence the README's explanation cites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.methods import method_style
from analysis.pretrain_figures import TASK, PretrainRun, pretrain_run_from_record
from experiments.loop.records import find_runs

EVAL_LOSS = "eval/loss"


@dataclass(frozen=True)
class DiagnosisRun:
    """One C4 run and the setting that tells it apart from the preset's."""

    run: PretrainRun
    max_steps: int
    tokens_per_step: int
    trained_besides_adapters: tuple[str, ...]   # FFT: everything
    final_train_loss: float
    final_eval_loss: float

    @property
    def setting(self) -> str:
        method = self.run.run.method
        if method == "fft":
            return "FFT (every weight)"
        extra = ", ".join(self.trained_besides_adapters) or "nothing else (embeddings, norms, head frozen)"
        return f"{method_style(method).label} r={self.run.run.rank} + {extra}"


def _diagnosis_run(record: dict) -> DiagnosisRun:
    config, run = record["config"], pretrain_run_from_record(record)
    train, final = config["train"], (record.get("summary") or {}).get("final", {})
    tokens = int(train["batch_size"]) * int(train.get("grad_accum", 1)) * int(config["task"]["seq_len"])
    return DiagnosisRun(run, int(train["max_steps"]), tokens,
                        tuple(config["method"].get("trainable_modules") or ()),
                        float(final.get("loss", math.nan)), float(final.get(EVAL_LOSS, math.nan)))


def load_diagnosis(root: str | Path) -> list[DiagnosisRun]:
    """Every completed C4 run under ``root`` (any depth), ordered by setting, steps and learning rate."""
    runs = [_diagnosis_run(r) for r in find_runs(root, **{"task.name": TASK})
            if (r.get("summary") or {}).get("status") == "completed"]
    if not runs:
        raise ValueError(f"no completed C4 runs under {root}")
    return sorted(runs, key=lambda d: (d.setting, d.max_steps, d.run.run.lr))


def diagnosis_markdown(runs: Sequence[DiagnosisRun], train_tokens: int | None = None) -> str:
    """The table; ``train_tokens`` (the training split's packed tokens) turns steps into epochs."""
    steps = sorted({s for d in runs for s in d.run.perplexity})
    lines = ["# C4 `mini`: what makes LoRA end below FFT (baselines only, seed 0)", "",
             "Validation perplexity (lower is better) at the end and at each evaluation; the training loss is the "
             "mean of the last logging window. Protocol: docs/calibration.md.", "",
             "| setting | lr | steps | epochs | final val. perplexity | final train loss | val. − train loss | "
             + " | ".join(f"ppl @ {s}" for s in steps) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(steps)]
    for d in runs:
        epochs = f"{d.max_steps * d.tokens_per_step / train_tokens:.1f}" if train_tokens else "–"
        curve = [f"{d.run.perplexity[s]:.1f}" if s in d.run.perplexity else "" for s in steps]
        lines.append(f"| {d.setting} | {d.run.run.lr:g} | {d.max_steps} | {epochs} | {d.run.final_perplexity:.1f} | "
                     f"{d.final_train_loss:.3f} | {d.final_eval_loss - d.final_train_loss:+.3f} | "
                     + " | ".join(curve) + " |")
    return "\n".join(lines) + "\n"


# the miniature the diagnosis measured (conf/experiment/pretrain_c4_first_mini.yaml; `make c4-diagnosis`)
DIAGNOSED_EXPERIMENT = "experiment=pretrain_c4_first_mini"


def preset_train_tokens(experiment: str = DIAGNOSED_EXPERIMENT) -> int:
    """Tokens in an experiment's `mini` packed training split (what one epoch is)."""
    from analysis.regime import c4_train_tokens

    return c4_train_tokens(experiment)


def write_diagnosis_report(root: str | Path, out: str | Path, train_tokens: int | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "c4_diagnosis.md"
    path.write_text(diagnosis_markdown(load_diagnosis(root), train_tokens), encoding="utf-8")
    return path
