"""The one entry point: ``python experiments/run.py method=mora rank=256 task=uuid``.

Composes the Hydra config (conf/), validates it into typed objects before any expensive work,
builds the model, injects the method's adapters, trains, evaluates, and writes one run folder
(config, metrics.jsonl, summary.json, environment.json, checkpoint). Paper scale:
``scale=paper`` (GPUs + hub access), multi-GPU with ``accelerate launch experiments/run.py ...``.

A bad input (a value the config refuses, a folder that holds another run, a damaged checkpoint)
ends the run with one line on stderr naming the field, the value and what is allowed, and exit
code 2; ``MORA_DEBUG=1 python experiments/run.py ...`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

# `python experiments/<script>.py` from a checkout: the repository root on the path instead of this
# folder, whose package names (data, models, ...) must not shadow installed libraries
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from experiments.data.offline import OfflineDataError  # noqa: E402
from experiments.models.loading import build_llama_from_config, load_model, model_skeleton  # noqa: E402
from experiments.loop.checkpoint import CHECKPOINT, check_checkpoint, load_checkpoint  # noqa: E402
from experiments.loop.records import (CONFIG, RunRecord, check_not_being_written, check_run_folder,  # noqa: E402
                                      config_differences, process_rank)
from experiments.schema import RunConfig, build_run_config  # noqa: E402
from experiments.loop.trackers import make_tracker  # noqa: E402
from experiments.loop.training import DivergedError, train  # noqa: E402
from experiments.tasks import Task, build_task  # noqa: E402
from experiments.threads import ThreadChoice, machine_threads  # noqa: E402
from mora.adapters import (LLAMA_TARGETS, adapter_summary, check_targets, inject_adapters,  # noqa: E402
                           trainable_parameter_count)

# how the learning rate was given: lr= or the preset's tables (make table3 sets lr_by_method, make c4-lr-grid lr=);
# the rate a run used is compared as resolved.lr, so these never hide a different rate
RATE_SOURCE_KEYS = ("lr", "lr_by_method", "lr_grid_by_method", "lr_by_rank", "lr_grid")
# config keys that may change between a run and its resumption
RESUMABLE_KEYS = ("resume", "logger", "device", "skip_completed", "threads") + RATE_SOURCE_KEYS
# and keys that do not change what a completed run measured, so skip_completed may reuse it across them: the
# evaluation batch size (UUID prompts have equal lengths and C4 blocks are scored token by token, so batching
# only changes speed)
SKIP_IGNORED_KEYS = RESUMABLE_KEYS + ("task.eval_batch_size",)
# errors in what the user asked for: one line, not a traceback (main)
INPUT_ERRORS = (ValueError, OSError, OfflineDataError)


def describe_adapters(model, run: RunConfig) -> str:
    """One line per distinct module shape: r (LoRA) or r̂ (MoRA) and parameters, plus the total."""
    seen = {}
    for row in adapter_summary(model):
        key = (row["name"].rsplit(".", 1)[-1], row["in_features"], row["out_features"])
        seen.setdefault(key, row)
    lines = [f"rank mapping: {run.rank.describe()}"]
    for (leaf, k, d), row in seen.items():
        shape = f"r̂={row['r_hat']}" if row["kind"] == "mora" else f"r={row['r']}"
        lines.append(f"  {leaf:>10} {k}->{d}: {shape}, {row['params']:,} params")
    lines.append(f"trainable parameters: {trainable_parameter_count(model):,}")
    return "\n".join(lines)


def execute(cfg: DictConfig) -> dict:
    """Run one configured experiment; returns its summary."""
    run = build_run_config(cfg, torch.cuda.is_available())
    config = OmegaConf.to_container(cfg, resolve=True) | {"resolved": {
        "lr": run.lr, "out_dir": str(run.out_dir), "effective_rank": run.rank.rank,
        "rank_representable": run.rank.representable, "rank_mapping": run.rank.describe(),
        "scheduler": run.train.scheduler, "alpha": run.adapter.alpha}}
    run, done = skip_or_resume(run, config)
    if done is not None:
        return done
    check_before_loading(run, config)
    # under a distributed launcher every process trains; rank 0 alone reports, evaluates and saves
    main_process = process_rank() == 0
    threads = set_threads(run, main_process)
    torch.manual_seed(run.seed)
    model, task = build_model_and_task(run)
    check_module_names(model, run)  # the loaded model, should it differ from its skeleton
    inject_adapters(model, run.adapter)
    if main_process:
        print(describe_adapters(model, run))
        print(task.describe())
    record = RunRecord.create(run.out_dir, config, resume=run.resume, ignore_on_resume=RESUMABLE_KEYS,
                              environment={"threads": {"count": threads.count, "reason": threads.reason}})
    tracker = make_tracker(run.logger.get("kind", "none"), **_tracker_kwargs(run, config))
    status = "completed"
    try:
        final = train(model, task, run.adapter, run.train, run.lr, record, tracker, device=run.device,
                      resume=run.resume, restarts=run.restarts)
        if run.singular_values and main_process:
            _save_delta_spectra(run, model)
        if main_process:
            final |= run_benchmarks(run, model, task)
    except DivergedError as err:
        final, status = {"error": str(err)}, "diverged"
    finally:
        tracker.finish()
    # the record's clock: every session of a resumed run, up to the state it continued from
    summary = {"status": status, "final": final, "train_seconds": round(record.elapsed(), 3),
               "trainable_parameters": trainable_parameter_count(model)}
    record.write_summary(summary)
    if main_process:
        print(f"[{status}] {run.out_dir} :: " + (final["error"] if status == "diverged" else ", ".join(
            f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))))
    return summary


def skip_or_resume(run: RunConfig, config: dict) -> tuple[RunConfig, dict | None]:
    """What ``skip_completed=true`` (the make targets) does with a run already in ``run.out_dir``: a
    finished one (it wrote its summary: completed, or diverged) is skipped and its summary returned;
    an interrupted one is resumed, so rerunning an interrupted target continues where it stopped."""
    if not run.skip_completed or not (run.out_dir / CONFIG).exists():
        return run, None
    summary_path = run.out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    held = f"a {summary['status']}" if summary else "an interrupted"
    # a folder name says method, rank, lr and seed only: a run of another preset (other pairs, model,
    # steps) can sit under the same name, and skipping or continuing it would report the wrong experiment;
    # an interrupted run continues, so only what a resume may change may differ
    differences = config_differences(run.out_dir, config, SKIP_IGNORED_KEYS if summary else RESUMABLE_KEYS)
    if differences:
        raise ValueError(f"skip_completed: {run.out_dir} holds {held} run of another config "
                         f"({'; '.join(differences)}); move it away or choose another out_root")
    if summary is not None:
        print(f"[skipped] {run.out_dir} is already finished, status {summary['status']} (skip_completed=true)")
        return run, summary
    print(f"[resuming] {run.out_dir} holds an interrupted run of this config (skip_completed=true)")
    return replace(run, resume=True), None


def check_before_loading(run: RunConfig, config: dict) -> None:
    """The checks that need no weights, done before a model is loaded (minutes at paper scale): the
    launcher's sharding is one this run supports, the run folder can be written (or resumed), the
    checkpoint to resume is readable, and the adapter's module names exist in the model's skeleton."""
    check_launch(run, os.environ)
    check_not_being_written(run.out_dir)
    check_run_folder(run.out_dir, config, resume=run.resume, ignore_on_resume=RESUMABLE_KEYS)
    if run.resume and (run.out_dir / CHECKPOINT).exists():
        check_checkpoint(run.out_dir / CHECKPOINT)
    if run.adapter.layer_kind is not None:
        check_module_names(model_skeleton(run.model, run.data_root), run)


def check_launch(run: RunConfig, env) -> None:
    """Refuse a sharded launch whose run could not be completed, resumed or measured: ``accelerate
    launch`` exports its config as environment variables (``env``). Supported: data parallelism and
    FSDP2, whose checkpoints are gathered (experiments/loop/checkpoint.py, tested on 2 CPU processes)."""
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        raise ValueError(
            f"the launch config's distributed_type DEEPSPEED (zero_stage {stage}, launch/deepspeed_zero{stage}.yaml) "
            "is not supported: ZeRO partitions Adam's states (stage 2) and the weights (stage 3), and this run's "
            "checkpoint, which resume=true, singular_values=true and experiments/eval.py read, is not gathered from "
            "DeepSpeed; launch with launch/fsdp.yaml (sharded, checkpoints gathered) or launch/multi_gpu.yaml")
    if env.get("ACCELERATE_USE_FSDP") != "true":
        return
    if env.get("FSDP_VERSION", "1") != "2":
        raise ValueError(f"the launch config's fsdp_version={env.get('FSDP_VERSION', '1')} is not supported: only "
                         "FSDP2 (fsdp_version: 2, launch/fsdp.yaml) has its checkpoints gathered and tested here")
    if run.restarts.merge_every is not None:
        raise ValueError(f"method.merge_every={run.restarts.merge_every} (ReLoRA/ReMoRA restarts) under FSDP "
                         "(launch/fsdp.yaml) is not supported: merging ΔW into sharded base weights was never run; "
                         "launch with launch/multi_gpu.yaml")
    if run.task.lm_eval is not None:
        raise ValueError(f"task.lm_eval_tasks={list(run.task.lm_eval.tasks)} under FSDP (launch/fsdp.yaml) is not "
                         "supported: lm-eval runs on rank 0 alone and a sharded model needs every rank; set "
                         "task.lm_eval_tasks=[] and score the run afterwards with experiments/eval.py --run <folder>")


def check_module_names(model, run: RunConfig) -> None:
    """``method.target_modules`` and ``method.trainable_modules`` must each match a module of
    ``model`` (its skeleton before loading, the model after); the error names the field, the names
    that match nothing and the model's Linear names."""
    try:
        check_targets(model, run.adapter)
    except ValueError as err:  # mora names AdapterConfig's fields; the config holds them under method.
        raise ValueError(f"method.{err}") from err


def set_threads(run: RunConfig, main_process: bool) -> ThreadChoice:
    """Set torch's CPU threads once, before any work, by ``run.threads`` (experiments/threads.py),
    and say so in the run's header."""
    choice = machine_threads(run.threads)
    torch.set_num_threads(choice.count)
    if main_process:
        print(choice.describe())
    return choice


def build_model_and_task(run: RunConfig):
    """(model, task). A pretrained base brings its tokenizer to the task; a model built from a
    config (pretraining from scratch) takes its vocabulary from the task's tokenizer."""
    task_args = {"batch_size": run.train.batch_size, "seed": run.seed, "data_root": run.data_root}
    if run.model.source == "config":
        task = build_task(run.task, None, **task_args)
        return build_llama_from_config(run.model, task.vocab_size, run.seed, run.train.dtype), task
    model, tokenizer = load_model(run.model, run.data_root, run.train.dtype)
    return model, build_task(run.task, tokenizer, **task_args)


def run_benchmarks(run: RunConfig, model, task: Task) -> dict[str, float]:
    """The task's lm-eval benchmarks on the trained model, in process (Section 5.2); results go to
    ``eval_results.json`` in the run folder and the returned metrics into the summary."""
    settings = task.lm_eval
    if settings is None:
        return {}
    from experiments.evaluation.harness import evaluate_with_lm_eval, save_eval_results

    results = evaluate_with_lm_eval(
        model, task.tokenizer, settings.tasks, data_root=run.data_root, num_fewshot=settings.fewshot,
        limit=settings.limit, batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks)
    path = save_eval_results(run.out_dir, results)
    print(f"lm-eval {', '.join(settings.tasks)} -> {path}")
    # a limited evaluation scores the first N documents only: its keys say so, so a table read from
    # summaries never mistakes a subset score for the benchmark's
    prefix = "lm_eval" if settings.limit is None else f"lm_eval_first{settings.limit}"
    return {f"{prefix}/{k}": v for k, v in results["metrics"].items()}


def _save_delta_spectra(run: RunConfig, model) -> None:
    """Singular values of ΔW = W_final - W_init per adapted module (Fig. 5), the pending adapter
    included. Both are rebuilt here, whole, whatever the launcher sharded: W_init from the seed (or
    reloaded), W_final from the run's final checkpoint; so a resumed run gets the same."""
    from experiments.evaluation.spectra import delta_spectra, effective_linear_weights, save_spectra

    def base_model():
        if run.model.source == "config":
            return build_llama_from_config(run.model, model.config.vocab_size, run.seed, run.train.dtype)
        return load_model(run.model, run.data_root, run.train.dtype)[0]

    final_model = base_model()
    inject_adapters(final_model, run.adapter)
    load_checkpoint(run.out_dir / CHECKPOINT, final_model)
    targets = run.adapter.target_modules or LLAMA_TARGETS  # FFT adapts nothing but changes every linear
    initial = effective_linear_weights(base_model(), targets)
    spectra = delta_spectra(initial, effective_linear_weights(final_model, targets))
    save_spectra(run.out_dir / "spectra.safetensors", spectra)
    print(f"singular values of ΔW for {len(spectra)} modules -> {run.out_dir / 'spectra.safetensors'}")


def _tracker_kwargs(run: RunConfig, config: dict) -> dict:
    if run.logger.get("kind") != "wandb":
        return {}
    return {"project": run.logger.get("project", "mora-repro"), "run_name": str(run.out_dir),
            "config": config, "mode": run.logger.get("mode", "offline"), "dir": str(run.out_dir),
            "group": run.logger.get("group")}


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        summary = execute(cfg)
    except INPUT_ERRORS as err:
        if os.environ.get("MORA_DEBUG") == "1":
            raise
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"error: {message} (MORA_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    if summary["status"] != "completed":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
