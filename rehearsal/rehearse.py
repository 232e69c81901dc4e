"""The paper path against the hub stand-ins, on CPU: ``python -m rehearsal`` (``make rehearse-paper``).

Every ``scale=paper`` preset runs a few optimizer steps through the unchanged entry point
(``experiments/run.py``) with ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` at the stand-ins
(:mod:`rehearsal.standins`), so the code resolves the real hub names: LLaMA-2 7B, t5-base, Tülu v2,
MetaMathQA, PubMed abstracts, C4 streamed, and lm-eval's MMLU, GSM8K, MATH and AdaptLLM sets. The
presets are shrunk only by the overrides in :data:`SHRINK` (width and depth where a preset builds
its model, steps, batch, sequence length, evaluation documents); the paper's ranks are mapped to
the stand-in's width by the repository's own rule (``rank_mapping.reference_width``, r/d kept).

Each step is one process (a Hydra sweep where a preset has several arms) and is checked from its run
folders: every run completed, saved a checkpoint, logged the metrics its preset promises (lm-eval
scores, C4 perplexity and ΔW spectra, UUID accuracy), and ReLoRA/ReMoRA wrote merges into the base
weights. Two steps kill a run after a checkpoint and resume it (its metrics must equal the
uninterrupted run's), one re-scores a saved run with merged adapters (``experiments/eval.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from experiments.loop.checkpoint import CHECKPOINT
from experiments.loop.records import find_runs, read_run
from experiments.paths import REPO_ROOT
from rehearsal.interrupt import KILLED
from rehearsal.standins import FINANCE_CORPUS, break_standin, build_standins, offline_environment

RUN = str(REPO_ROOT / "experiments" / "run.py")
EVAL = str(REPO_ROOT / "experiments" / "eval.py")
TABLE1_METHODS = "lora,loraplus,asylora,relora,dora,mora"     # + fft, once per rank regime
C4_METHODS = "fft,lora,mora,relora,remora"

# The only changes to the paper presets: the stand-in's size, fewer steps, smaller batches, a few
# evaluation documents. model.hidden_size is the width the rank mapping reads (the hub model brings
# its own shape); requires_gpu=false lets a CPU run what the preset reserves for GPUs.
SHRINK = {
    "llama2_7b": ("model.hidden_size=64", "model.requires_gpu=false", "rank_mapping.reference_width=4096",
                  "device=cpu"),
    "finetune": ("train.max_steps=3", "train.warmup_steps=1", "train.batch_size=2", "train.grad_accum=2",
                 "train.log_every=1", "train.ckpt_every=2", "restart.every=1", "task.lm_eval_limit=2",
                 "task.lm_eval_batch_size=4", "task.lm_eval_max_gen_toks=8"),
    "text": ("task.max_len=256",),   # continual pretraining: 256-token blocks, not 2,048 (bf16 on a CPU is slow)
    "uuid": ("train.max_steps=3", "train.warmup_steps=1", "train.batch_size=4", "task.n_pairs=8",
             "task.eval_pairs=4", "train.eval_steps=[3]", "train.log_every=1", "train.ckpt_every=2"),
    # 250M / 1.3B at 1/8 and 1/16 of their width, 2 layers, their head width and FFN ratio kept
    "llama_250m": ("model.hidden_size=96", "model.intermediate_size=320", "model.num_layers=2",
                   "model.num_heads=2", "rank_mapping.reference_width=768"),
    "llama_1b": ("model=llama_1b", "model.hidden_size=128", "model.intermediate_size=341", "model.num_layers=2",
                 "model.num_heads=2", "rank_mapping.reference_width=2048"),
    "c4": ("model.requires_gpu=false", "device=cpu", "train.max_steps=4", "train.warmup_steps=1",
           "train.batch_size=2", "train.grad_accum=2", "train.log_every=1", "train.ckpt_every=2",
           "train.eval_steps=[2,4]", "restart.every=2", "restart.warmup_steps=1", "task.seq_len=64",
           "task.eval_tokens=256", "task.eval_batch_size=4"),
}
LM_EVAL_OFF = ("task.lm_eval_tasks=[]",)


@dataclass(frozen=True)
class Expect:
    """What the run folders of a step must show."""

    runs: int                                  # completed runs under the step's folder
    final: tuple[str, ...] = ()                # keys of every run's summary "final" metrics
    files: tuple[str, ...] = (CHECKPOINT,)     # files in every run folder
    merged: tuple[str, ...] = ("relora", "remora")  # methods whose base weights must hold merges


@dataclass(frozen=True)
class Step:
    preset: str
    name: str
    covers: str
    command: Callable[[Path, Path], list[str]]      # (step folder, work folder) -> argv
    expect: Expect | None = None
    check: Callable[..., list[str]] | None = None   # (step folder, work folder, env, log) -> problems
    after: tuple[str, ...] = ()                     # steps whose runs this one reads
    exit_code: int = 0                              # what the command must return

    @property
    def key(self) -> str:
        return f"{self.preset}/{self.name}"


def sweep(*overrides: str) -> Callable[[Path, Path], list[str]]:
    """``experiments/run.py -m <overrides>`` into the step's folder (``{out}`` is that folder)."""
    return lambda out, work: [sys.executable, RUN, "-m", *(o.replace("{out}", str(out)) for o in overrides)]


def _finetune(task: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    return ("scale=paper", f"task={task}", *SHRINK["llama2_7b"], *SHRINK["finetune"], *extra)


def methods_step(task: str, preset: str, extra: tuple[str, ...] = ()) -> Step:
    """Table 1's methods at both rank regimes (fft at each: one folder per rank), no benchmark."""
    return Step(preset, "Table 1 methods, r=8 and 256", "fft + " + TABLE1_METHODS,
                sweep(*_finetune(task, extra), "experiment=finetune_r8,finetune_r256", f"method=fft,{TABLE1_METHODS}",
                      "out_root={out}/r${rank}", *LM_EVAL_OFF), Expect(runs=14))


def lm_eval_step(task: str, preset: str, lm_eval: str, metric: str, extra: tuple[str, ...] = ()) -> Step:
    """MoRA r=8 scored with the task's lm-eval tasks ``lm_eval``; ``metric`` must be in its summary."""
    return Step(preset, f"lm-eval {lm_eval}", "mora r=8 (rotate), scored after training",
                sweep(*_finetune(task, extra), "experiment=finetune_r8", "method=mora", "out_root={out}"),
                Expect(runs=1, final=(f"lm_eval_first2/{metric}",), files=(CHECKPOINT, "eval_results.json")))


def c4_steps(size: str, label: str) -> list[Step]:
    return [Step("c4_paper", f"{label}: Fig. 4, Table 3, Fig. 5", C4_METHODS + ", merges every 2 steps, jagged",
                 sweep("scale=paper", "experiment=pretrain_c4", f"method={C4_METHODS}", *SHRINK[size], *SHRINK["c4"],
                       "out_root={out}"),
                 Expect(runs=5, final=("eval/perplexity",), files=(CHECKPOINT, "spectra.safetensors")))]


def steps() -> list[Step]:
    """Every step of the rehearsal, in order (a step reading another's runs comes after it)."""
    finance = (*SHRINK["text"], f"task.hub_id={FINANCE_CORPUS}")  # the preset leaves the corpus to the user
    table4 = "metamath_paper/lm-eval gsm8k_metamath, math_metamath (Table 4 operators)"
    c4_13b = "c4_paper/1.3B: Fig. 4, Table 3, Fig. 5"
    return [
        Step("uuid_paper", "Table 2 arms", "fft, lora, mora at r=8 and 256",
             sweep("scale=paper", "task=uuid", "experiment=uuid_memory", "method=fft,lora,mora", "rank=8,256",
                   *SHRINK["llama2_7b"], *SHRINK["uuid"], "out_root={out}/r${rank}"),
             Expect(runs=6, final=("eval/char_accuracy",))),
        methods_step("tulu", "tulu_paper"),
        lm_eval_step("tulu", "tulu_paper", "mmlu 0-shot", "mmlu/acc"),
        Step("tulu_paper", "lm-eval mmlu 5-shot", "mora r=256 (share), MMLU with 5 shots",
             sweep(*_finetune("tulu", ()), "experiment=finetune_r256", "method=mora", "task.lm_eval_fewshot=5",
                   "out_root={out}"),
             Expect(runs=1, final=("lm_eval_first2/mmlu@5shot/acc",), files=(CHECKPOINT, "eval_results.json"))),
        methods_step("metamath", "metamath_paper"),
        Step("metamath_paper", "lm-eval gsm8k_metamath, math_metamath (Table 4 operators)",
             "mora truncate, share, decouple, rotate at r=8 and 256",
             sweep(*_finetune("metamath", ()), "experiment=finetune_r8,finetune_r256", "method=mora",
                   "method.operator=truncate,share,decouple,rotate", "out_root={out}"),
             Expect(runs=8, final=("lm_eval_first2/gsm8k_metamath/exact_match", "lm_eval_first2/math_metamath/exact_match"),
                    files=(CHECKPOINT, "eval_results.json"))),
        methods_step("biomed", "biomed_paper", SHRINK["text"]),
        lm_eval_step("biomed", "biomed_paper", "biomed_adaptllm", "biomed_adaptllm/acc", SHRINK["text"]),
        methods_step("finance", "finance_paper", finance),
        lm_eval_step("finance", "finance_paper", "finance_adaptllm", "finance_adaptllm/score", finance),
        *c4_steps("llama_250m", "250M"),
        *c4_steps("llama_1b", "1.3B"),
        resume_step("c4_paper", "resume: ReMoRA 1.3B killed after step 2", "merge, group switch and stream replay",
                    Resume(c4_13b, "remora", ("scale=paper", "experiment=pretrain_c4", "method=remora",
                                              *SHRINK["llama_1b"], *SHRINK["c4"]))),
        resume_step("metamath_paper", "resume: MoRA rotate r=8 killed after step 2", "optimizer, schedule, RNG",
                    Resume(table4, "mora-rotate-r8", (*_finetune("metamath", ()), "experiment=finetune_r8",
                                                      "method=mora", "method.operator=rotate"))),
        Step("metamath_paper", "experiments/eval.py --merge on a saved run", "checkpoint reloaded, adapters merged",
             eval_command(table4, "mora-rotate-r8"), check=merged_evaluation, after=(table4,)),
    ]


# ------------------------------------------------------------------------------------- resume

def step_folder(work: Path, key: str) -> Path:
    """The step's folder: its key with only letters, digits, '.', '_' and '-' (Hydra parses the path)."""
    return work / "runs" / re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def _only_run(work: Path, after: str, prefix: str) -> Path:
    dirs = [run["dir"] for run in find_runs(step_folder(work, after)) if run["dir"].name.startswith(prefix + "-")]
    if len(dirs) != 1:
        raise FileNotFoundError(f"no single {prefix} run in {step_folder(work, after)} (found {len(dirs)})")
    return dirs[0]


@dataclass(frozen=True)
class Resume:
    """A run of ``after``'s sweep (the one whose folder starts with ``prefix``) again, with ``overrides``:
    killed after the checkpoint of step 2, resumed with ``resume=true``, compared with the original."""

    after: str
    prefix: str
    overrides: tuple[str, ...]

    def killed(self, out: Path, work: Path) -> list[str]:
        return [sys.executable, "-m", "rehearsal.interrupt", "2", *self.overrides, f"out_dir={out / 'run'}"]

    def check(self, out: Path, work: Path, env: dict, log) -> list[str]:
        killed = out / "run"
        if (killed / "summary.json").exists() or not (killed / CHECKPOINT).exists():
            return [f"{killed} was not left as a killed run (a checkpoint, no summary)"]
        command = [sys.executable, RUN, *self.overrides, f"out_dir={killed}", "resume=true"]
        if subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log).returncode:
            return [f"resuming {killed} failed: {last_error(Path(log.name))}"]
        resumed, whole = read_run(killed), read_run(_only_run(work, self.after, self.prefix))
        rows = [[{k: v for k, v in m.items() if k != "time"} for m in run["metrics"]] for run in (resumed, whole)]
        problems = [] if rows[0] == rows[1] else [f"resumed metrics {rows[0]} differ from the uninterrupted {rows[1]}"]
        if (resumed["summary"] or {}).get("final") != whole["summary"]["final"]:
            problems.append("the resumed run's final metrics differ from the uninterrupted run's")
        if len((resumed["environment"] or {}).get("resumes", [])) != 1:
            problems.append("the resumed run does not record its resumption")
        return problems


def resume_step(preset: str, name: str, covers: str, resume: Resume) -> Step:
    return Step(preset, name, covers, resume.killed, check=resume.check, after=(resume.after,), exit_code=KILLED)


def eval_command(after: str, prefix: str) -> Callable[[Path, Path], list[str]]:
    def command(out: Path, work: Path) -> list[str]:
        return [sys.executable, EVAL, "--run", str(_only_run(work, after, prefix)), "--tasks", "gsm8k_metamath",
                "--limit", "2", "--max-gen-toks", "8", "--batch-size", "4", "--merge", "--out", str(out)]
    return command


def merged_evaluation(out: Path, work: Path, env: dict, log) -> list[str]:
    import json
    path = out / "eval_results.json"
    if not path.exists():
        return [f"{path} was not written"]
    [evaluation] = json.loads(path.read_text())["evaluations"]
    keys = set(evaluation["metrics"])
    return [] if evaluation.get("merged") and "gsm8k_metamath/exact_match" in keys else [f"unexpected {evaluation}"]


# ------------------------------------------------------------------------------------- checks

def check_runs(out: Path, expect: Expect) -> list[str]:
    import torch

    runs = find_runs(out)
    done = [run for run in runs if (run["summary"] or {}).get("status") == "completed"]
    problems = [] if len(done) == expect.runs else [f"{len(done)} of {expect.runs} runs completed"]
    for run in done:
        final = run["summary"]["final"]
        problems += [f"{run['dir'].name}: no {key}* in its final metrics" for key in expect.final
                     if not any(k.startswith(key) for k in final)]
        problems += [f"{run['dir'].name}: no {name}" for name in expect.files if not (run["dir"] / name).exists()]
        if run["config"]["method"]["name"] in expect.merged:
            weights = torch.load(run["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)["weights"]
            flags = [t.item() for k, t in weights.items() if k.endswith(".base_weight_modified")]
            if not flags or not all(flags):
                problems.append(f"{run['dir'].name}: no merge reached the base weights")
    return problems


def last_error(log_path: Path) -> str:
    """The line that says why a step failed: the entry point's ``error:`` line, else the last one."""
    noise = ("Set the environment variable HYDRA_FULL_ERROR", "See https://hydra.cc")
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith(noise)]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or ["(no output)"])[-1][:400]


@dataclass
class Outcome:
    step: Step
    passed: bool
    seconds: float
    problems: list[str] = field(default_factory=list)


def run_step(step: Step, work: Path, env: dict, failed: set[str]) -> Outcome:
    if any(dep in failed for dep in step.after):
        return Outcome(step, False, 0.0, [f"skipped: {', '.join(step.after)} failed"])
    out = step_folder(work, step.key)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            command = step.command(out, work)
        except (OSError, ValueError) as err:
            return Outcome(step, False, 0.0, [str(err)])
        code = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log).returncode
        problems = [] if code == step.exit_code else [f"exit code {code}: {last_error(log_path)}"]
        if not problems and step.expect is not None:
            problems += check_runs(out, step.expect)
        if not problems and step.check is not None:
            problems += step.check(out, work, env, log)
    return Outcome(step, not problems, time.monotonic() - start, problems)


def report(outcomes: list[Outcome], build_seconds: float) -> str:
    lines = [f"{'preset':<15} {'step':<58} {'result':<6} {'wall s':>7}", "-" * 90,
             f"{'(stand-ins)':<15} {'build the hub stand-ins':<58} {'pass':<6} {build_seconds:7.1f}"]
    for o in outcomes:
        lines.append(f"{o.step.preset:<15} {o.step.name[:58]:<58} {'pass' if o.passed else 'FAIL':<6} {o.seconds:7.1f}")
        lines += [f"{'':<15}   ! {p}" for p in o.problems]
    totals: dict[str, float] = {}
    for o in outcomes:
        totals[o.step.preset] = totals.get(o.step.preset, 0.0) + o.seconds
    lines += ["-" * 90] + [f"{p:<15} {'all steps':<58} {'pass' if all(o.passed for o in outcomes if o.step.preset == p) else 'FAIL':<6} "
                           f"{s:7.1f}" for p, s in totals.items()]
    lines.append(f"{'total':<74} {build_seconds + sum(totals.values()):7.1f}")
    return "\n".join(lines)


def rehearse(work: Path, only: list[str] | None = None, rename_column: tuple[str, str, str] | None = None,
             home: Path | None = None) -> list[Outcome]:
    """Build the stand-ins into ``work/hf_home`` (or use ``home``) and run the steps (all, or those
    whose "preset/name" contains one of ``only``); prints the table, returns the outcomes."""
    start = time.monotonic()
    if home is None:
        home = work / "hf_home"
        build_standins(home)
    if rename_column is not None:
        home = break_standin(home, work / "hf_home_broken", *rename_column)
    build_seconds = time.monotonic() - start
    env = {**os.environ, **offline_environment(home), "PYTHONPATH": str(REPO_ROOT), "MORA_DEBUG": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    chosen = [s for s in steps() if not only or any(o in s.key for o in only)]
    outcomes, failed = [], set()
    for step in chosen:
        outcome = run_step(step, work, env, failed)
        if not outcome.passed:
            failed.add(step.key)
        outcomes.append(outcome)
        print(f"[{'pass' if outcome.passed else 'FAIL'}] {step.key} ({outcome.seconds:.1f} s)"
              + "".join(f"\n    ! {p}" for p in outcome.problems), flush=True)
    print(report(outcomes, build_seconds), flush=True)
    return outcomes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run the steps whose 'preset/step' contains this (repeatable)")
    parser.add_argument("--work", default=None, help="folder for the stand-ins, runs and logs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--rename-column", default=None, metavar="REPO:OLD:NEW",
                        help="break one stand-in on purpose: rename a column of data set REPO")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in steps():
            print(f"{s.preset}/{s.name}: {s.covers}")
        return 0
    rename = tuple(args.rename_column.rsplit(":", 2)) if args.rename_column else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mora-rehearsal-"))
    try:
        outcomes = rehearse(work, args.only, rename)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"stand-ins, runs and logs: {work}")
    return 0 if outcomes and all(o.passed for o in outcomes) else 1
