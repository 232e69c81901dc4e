"""The training loop: accelerate-driven, checkpointed, resumable, stopping on a non-finite loss.

The loop is task-agnostic: a task gives ``batch(step, process_index, num_processes)`` (a pure
function of the step, so a resumed run sees the same data) and ``evaluate(model, device)``.
ReLoRA/ReMoRA restarts (Section 5.3; Lialin et al. 2023) happen after optimizer step m·merge_every
(m ≥ 1, before the last step): merge ΔW into W, re-initialise the adapters, switch MoRA's sharing
groups (``group_switch``, Appendix B) and drop the adapters' optimizer state. With
``scheduler=jagged_cosine`` the restarts are the schedule's cycle boundaries, so the first step
after each merge runs at learning rate 0 and warms up again (experiments/loop/schedules.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from mora.adapters import (AdapterConfig, adapter_layers, adapter_state_dict, build_optimizer,
                           load_adapter_state_dict, merge_and_reinit, mora_layers)
from mora.operators import GROUP_SWITCHES, next_groups

from experiments.loop.records import RunRecord, atomic_torch_save, read_run
from experiments.loop.schedules import build_scheduler
from experiments.schema import TrainSpec

CHECKPOINT = "checkpoint.pt"


class DivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class LoopState:
    step: int = 0
    window_loss: float = 0.0
    window_steps: int = 0


def _adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for layer in adapter_layers(model).values()
            for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


def restart_adapters(model, optimizer, group_switch: str = "none") -> None:
    """ReLoRA/ReMoRA restart: merge ΔW into W, re-init the adapters, switch MoRA's groups, reset
    the adapters' optimizer state.

    Re-init is :func:`mora.adapters.merge_and_reinit` (LoRA: A Kaiming-uniform a=√5, B zero;
    MoRA: M zero; same Parameter objects, so the optimizer still holds them).
    """
    merge_and_reinit(model, _next_groups(model, group_switch))
    reset_adapter_optimizer_state(model, optimizer)


def _next_groups(model, group_switch: str) -> tuple[str, str] | None:
    """The sharing groups every MoRA layer takes after this merge (None: leave them)."""
    current = {(l.mora.layout.compress_groups, l.mora.layout.decompress_groups)
               for l in mora_layers(model).values()}
    if group_switch == "none" or not current:
        return None
    if len(current) > 1:
        raise RuntimeError(f"MoRA layers disagree on their sharing groups {sorted(current)}; cannot switch them together")
    return next_groups(current.pop(), group_switch)


def reset_adapter_optimizer_state(model, optimizer) -> None:
    """Forget the optimizer state (Adam's moments and step) of the adapter parameters only.

    ReLoRA resets the optimizer at each merge for the adapters alone: the moments of the old A, B
    (or M) describe a ΔW that now lives in W. Embeddings, norms, lm_head and any other trainable
    parameter keep theirs. State is keyed by Parameter, so param groups (LoRA+) need no care;
    accelerate's AcceleratedOptimizer keeps the state on the optimizer it wraps.
    """
    state = getattr(optimizer, "optimizer", optimizer).state
    for param in _adapter_parameters(model):
        state.pop(param, None)


def _check_restarts(model, merge_every: int | None, group_switch: str) -> None:
    """Refuse restart settings that would silently do nothing or fail at the first merge."""
    if group_switch not in GROUP_SWITCHES:
        raise ValueError(f"group_switch must be one of {GROUP_SWITCHES}, got group_switch={group_switch!r}")
    if merge_every is not None and (not isinstance(merge_every, int) or merge_every <= 0):
        raise ValueError(f"merge_every must be a positive integer or None, got merge_every={merge_every!r}")
    if merge_every and not adapter_layers(model):
        raise ValueError(f"merge_every={merge_every} merges adapters, but the model has none (full fine-tuning?)")
    if group_switch == "none":
        return
    if not merge_every:
        raise ValueError(f"group_switch={group_switch!r} switches MoRA's groups at merges; set merge_every")
    operators = {l.mora.layout.operator for l in mora_layers(model).values()}
    if operators != {"share"}:
        raise ValueError(f"group_switch={group_switch!r} changes the sharing groups of MoRA operator='share'; "
                         f"the model's MoRA operators are {sorted(operators) or 'none (no MoRA layers)'}")


def _build_scheduler(optimizer, spec: TrainSpec, merge_every: int | None):
    """The spec's schedule; jagged_cosine restarts at the merges (Section 5.3's "jagged scheduler").

    ``min_lr_ratio`` and ``restart_warmup_steps`` are read with defaults so that a TrainSpec
    without them (older configs) still works.
    """
    return build_scheduler(optimizer, spec.scheduler, max_steps=spec.max_steps, warmup_steps=spec.warmup_steps,
                           min_lr_ratio=getattr(spec, "min_lr_ratio", None) or 0.0,
                           restart_every=merge_every if spec.scheduler == "jagged_cosine" else None,
                           restart_warmup_steps=getattr(spec, "restart_warmup_steps", None) or 0)


def _save_checkpoint(path: Path, model, adapter: AdapterConfig, optimizer, scheduler, state: LoopState) -> None:
    groups = {n: (l.mora.layout.compress_groups, l.mora.layout.decompress_groups)
              for n, l in mora_layers(model).items()}
    atomic_torch_save({
        "loop": vars(state), "weights": adapter_state_dict(model, adapter), "mora_groups": groups,
        "base_modified": [n for n, l in adapter_layers(model).items() if getattr(l, "base_weight_modified", False)],
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }, path)


def _rng_state() -> dict:
    """Python and torch RNGs, CUDA's too: dropout and ReLoRA's Kaiming re-init on a GPU draw from it."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> LoopState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for name, groups in ckpt["mora_groups"].items():
        model.get_submodule(name).mora.set_groups(*groups)
    for name in ckpt["base_modified"]:
        model.get_submodule(name).base_weight_modified = True
    load_adapter_state_dict(model, ckpt["weights"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return LoopState(**ckpt["loop"])


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
          tracker, *, device: str, resume: bool, merge_every: int | None = None,
          group_switch: str = "none") -> dict:
    """Run ``train_spec.max_steps`` optimizer steps; returns the final metrics.

    ``merge_every``: ReLoRA/ReMoRA restart after every ``merge_every``-th step (None: never);
    ``group_switch``: how MoRA's sharing groups change at each restart (mora.operators.GROUP_SWITCHES).
    """
    _check_restarts(model, merge_every, group_switch)
    accelerator = Accelerator(cpu=device == "cpu", gradient_accumulation_steps=train_spec.grad_accum)
    _check_sharding(accelerator, train_spec.batch_size)
    optimizer = build_optimizer(model, adapter, lr=lr, weight_decay=train_spec.weight_decay)
    scheduler = _build_scheduler(optimizer, train_spec, merge_every)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt_path = record.dir / CHECKPOINT
    state, final = LoopState(), {}
    if resume and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, accelerator.unwrap_model(model), optimizer, scheduler)
        record.truncate_after(state.step)
        for row in read_run(record.dir)["metrics"]:  # what the loop had gathered (all, if it had finished)
            final |= {k: v for k, v in row.items() if k not in ("step", "time")}
        accelerator.print(f"resumed from {ckpt_path} at step {state.step}")
    model.train()
    bar = tqdm(total=train_spec.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    while state.step < train_spec.max_steps:
        loss = _optimizer_step(model, task, accelerator, optimizer, scheduler, train_spec, state)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if merge_every and state.step % merge_every == 0 and state.step < train_spec.max_steps:
            # after step m·T, where a jagged schedule's multiplier for the next step is 0
            restart_adapters(accelerator.unwrap_model(model), optimizer, group_switch)
        final.update(_log_and_evaluate(model, task, accelerator, scheduler, train_spec, state, record, tracker))
        if state.step % train_spec.ckpt_every == 0 or state.step == train_spec.max_steps:
            if accelerator.is_main_process:
                _save_checkpoint(ckpt_path, accelerator.unwrap_model(model), adapter, optimizer, scheduler, state)
    bar.close()
    return final


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
                raise DivergedError(f"loss is {global_loss.item()} at step {state.step + 1}; stopping. The last "
                                    "checkpoint holds the last good state")
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
