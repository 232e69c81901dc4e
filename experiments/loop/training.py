"""The training loop: accelerate-driven, checkpointed, resumable, stopping on a non-finite loss.

The loop is task-agnostic: a task gives ``batch(step, process_index, num_processes)`` (a pure
function of the step, so a resumed run sees the same data) and ``evaluate(model, device)``.
ReLoRA/ReMoRA restarts (Section 5.3; Lialin et al. 2023; :mod:`mora.restarts`) happen after
optimizer step m·merge_every (m ≥ 1, before the last step). With ``scheduler=jagged_cosine`` the
restarts are the schedule's cycle boundaries, so the first step after each merge runs at learning
rate 0 and warms up again (experiments/loop/schedules.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from tqdm import tqdm

from mora.adapters import AdapterConfig, build_optimizer
from mora.restarts import RestartConfig, check_restarts, restart_adapters

from experiments.loop.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from experiments.loop.records import RunRecord, read_run
from experiments.loop.schedules import build_scheduler
from experiments.schema import TrainSpec


class DivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class LoopState:
    step: int = 0
    window_loss: float = 0.0
    window_steps: int = 0


def _build_scheduler(optimizer, spec: TrainSpec, restarts: RestartConfig):
    """The spec's schedule; jagged_cosine restarts at the merges (Section 5.3's "jagged scheduler")."""
    jagged = spec.scheduler == "jagged_cosine"
    return build_scheduler(optimizer, spec.scheduler, max_steps=spec.max_steps, warmup_steps=spec.warmup_steps,
                           min_lr_ratio=spec.min_lr_ratio, restart_every=restarts.merge_every if jagged else None,
                           restart_warmup_steps=restarts.restart_warmup_steps if jagged else 0)


def _check_sharding(accelerator, batch_size: int) -> None:
    """Each process takes ``batch_size / num_processes`` rows of every global batch (the tasks
    shard by process index), so the batch must divide evenly: then the mean of the processes'
    gradients is the global batch's. DeepSpeed is told that per-process size, since the loop
    prepares no dataloader for it to read one from (accelerate refuses ``auto`` otherwise)."""
    if batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of processes "
                         f"({accelerator.num_processes}): every process takes an equal share of each batch")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size // accelerator.num_processes


def train(model, task, adapter: AdapterConfig, train_spec: TrainSpec, lr: float, record: RunRecord,
          tracker, *, device: str, resume: bool, restarts: RestartConfig = RestartConfig()) -> dict:
    """Run ``train_spec.max_steps`` optimizer steps; returns the final metrics.

    ``restarts``: when ReLoRA/ReMoRA merge and restart the adapters (default: never).
    """
    check_restarts(restarts, adapter)
    accelerator = Accelerator(cpu=device == "cpu", gradient_accumulation_steps=train_spec.grad_accum)
    _check_sharding(accelerator, train_spec.batch_size)
    optimizer = build_optimizer(model, adapter, lr=lr, weight_decay=train_spec.weight_decay)
    scheduler = _build_scheduler(optimizer, train_spec, restarts)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt_path = record.dir / CHECKPOINT
    state, final, logged_steps = LoopState(), {}, set()
    if resume:
        state = _restore(ckpt_path, accelerator, model, optimizer, scheduler, record)
        for row in read_run(record.dir)["metrics"]:  # what the loop had gathered (all, if it had finished)
            final |= {k: v for k, v in row.items() if k not in ("step", "time")}
            logged_steps.add(row["step"])
    saved_step = state.step if resume and ckpt_path.exists() else None  # what a divergence falls back to
    if state.step == 0 and 0 in train_spec.eval_steps and 0 not in logged_steps:
        _evaluate_before_training(model, task, accelerator, record, tracker)
    model.train()
    bar = tqdm(total=train_spec.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    try:
        while state.step < train_spec.max_steps:
            loss = _optimizer_step(model, task, accelerator, optimizer, scheduler, train_spec, state)
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if restarts.restart_after(state.step, train_spec.max_steps):
                # after step m·T, where a jagged schedule's multiplier for the next step is 0
                restart_adapters(accelerator.unwrap_model(model), optimizer, restarts.group_switch)
            final.update(_log_and_evaluate(model, task, accelerator, scheduler, train_spec, state, record, tracker))
            if state.step % train_spec.ckpt_every == 0 or state.step == train_spec.max_steps:
                # every process: under FSDP the shards are gathered from all of them; rank 0 writes
                save_checkpoint(ckpt_path, accelerator.unwrap_model(model), adapter, optimizer, scheduler,
                                asdict(state))
                saved_step = state.step
    except DivergedError as err:
        kept = (f"{ckpt_path} holds the last good state (step {saved_step})" if saved_step is not None else
                f"no checkpoint was written before it (train.ckpt_every={train_spec.ckpt_every})")
        raise DivergedError(f"{err}; {kept}") from None
    bar.close()
    return final


def _restore(ckpt_path, accelerator, model, optimizer, scheduler, record: RunRecord) -> LoopState:
    """The state a resumed run continues from: its checkpoint's, or step 0 when it stopped before
    the first one. The metrics logged after that step are dropped, as the run logs them again."""
    if ckpt_path.exists():
        state = LoopState(**load_checkpoint(ckpt_path, accelerator.unwrap_model(model), optimizer, scheduler))
        accelerator.print(f"resumed from {ckpt_path} at step {state.step}")
    else:
        state = LoopState()
        accelerator.print(f"resume: no checkpoint in {record.dir}, so this run starts clean from step 0 "
                          "(metrics logged before are dropped)")
    record.truncate_after(state.step)
    return state


def _optimizer_step(model, task, accelerator, optimizer, scheduler, spec: TrainSpec, state: LoopState) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; raises DivergedError on NaN/inf."""
    total = 0.0
    for micro in range(spec.grad_accum):
        batch = task.batch(state.step * spec.grad_accum + micro, accelerator.process_index,
                           accelerator.num_processes)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            # the mean over processes: the global batch's loss (equal-sized shards), the same
            # value on every rank, so all ranks stop together on a NaN instead of one hanging
            global_loss = accelerator.reduce(loss.detach(), reduction="mean")
            if not torch.isfinite(global_loss):
                raise DivergedError(f"loss is {global_loss.item()} at step {state.step + 1}; stopping")
            accelerator.backward(loss)
            if spec.grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += global_loss.item() / spec.grad_accum
    state.window_loss += total
    state.window_steps += 1
    return total


def _evaluate_before_training(model, task, accelerator, record: RunRecord, tracker) -> None:
    """``train.eval_steps`` holds 0: the untrained model's scores, logged at step 0 (the base before any
    update; a resumed run that kept this row does not log it again)."""
    metrics = {f"eval/{k}": v for k, v in task.evaluate(accelerator.unwrap_model(model), accelerator.device).items()}
    if metrics and accelerator.is_main_process:
        record.log(0, **metrics)
        tracker.log(metrics, step=0)


def _log_and_evaluate(model, task, accelerator, scheduler, spec: TrainSpec, state: LoopState,
                      record: RunRecord, tracker) -> dict:
    metrics = {}
    if state.step % spec.log_every == 0 or state.step == spec.max_steps:
        metrics |= {"loss": state.window_loss / max(1, state.window_steps), "lr": scheduler.get_last_lr()[0]}
        state.window_loss, state.window_steps = 0.0, 0
    if state.step in spec.eval_steps or state.step == spec.max_steps:
        metrics |= {f"eval/{k}": v for k, v in task.evaluate(accelerator.unwrap_model(model), accelerator.device).items()}
    if metrics and accelerator.is_main_process:
        record.log(state.step, **metrics)
        tracker.log(metrics, step=state.step)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise DivergedError(f"non-finite metric at step {state.step}: {metrics}")
    return metrics
