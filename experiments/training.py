"""The training loop: accelerate-driven, checkpointed, resumable, stopping on a non-finite loss.

The loop is task-agnostic: a task gives ``batch(step, process_index, num_processes)`` (a pure
function of the step, so a resumed run sees the same data) and ``evaluate(model, device)``.
ReLoRA/ReMoRA restarts (merge, re-init, reset the adapters' optimizer state) happen every
``merge_every`` steps; the jagged learning-rate schedule of the pretraining experiments is not
part of this loop yet.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import get_scheduler

from mora.adapters import (AdapterConfig, adapter_layers, adapter_state_dict, build_optimizer,
                           load_adapter_state_dict, merge_and_reinit, mora_layers)

from .records import RunRecord, atomic_torch_save, read_run
from .schema import TrainSpec

CHECKPOINT = "checkpoint.pt"
_SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


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


def restart_adapters(model, optimizer, switch_groups: bool) -> None:
    """ReLoRA/ReMoRA restart: merge ΔW into W, re-init adapters, drop their optimizer state."""
    groups = None
    if switch_groups and mora_layers(model):
        layout = next(iter(mora_layers(model).values())).mora.layout.switched()
        groups = (layout.compress_groups, layout.decompress_groups)
    merge_and_reinit(model, groups)
    for param in _adapter_parameters(model):
        optimizer.state.pop(param, None)


def _save_checkpoint(path: Path, model, adapter: AdapterConfig, optimizer, scheduler, state: LoopState) -> None:
    groups = {n: (l.mora.layout.compress_groups, l.mora.layout.decompress_groups)
              for n, l in mora_layers(model).items()}
    atomic_torch_save({
        "loop": vars(state), "weights": adapter_state_dict(model, adapter), "mora_groups": groups,
        "base_modified": [n for n, l in adapter_layers(model).items() if getattr(l, "base_weight_modified", False)],
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }, path)


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
    return LoopState(**ckpt["loop"])


def train(model, task, adapter: AdapterConfig, train_spec: TrainSpec, lr: float, record: RunRecord,
          tracker, *, device: str, resume: bool, merge_every: int | None = None,
          switch_groups: bool = False) -> dict:
    """Run ``train_spec.max_steps`` optimizer steps; returns the final metrics."""
    accelerator = Accelerator(cpu=device == "cpu", gradient_accumulation_steps=train_spec.grad_accum)
    optimizer = build_optimizer(model, adapter, lr=lr, weight_decay=train_spec.weight_decay)
    scheduler = get_scheduler(_SCHEDULER_NAMES[train_spec.scheduler], optimizer,
                              num_warmup_steps=train_spec.warmup_steps, num_training_steps=train_spec.max_steps)
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
            restart_adapters(accelerator.unwrap_model(model), optimizer, switch_groups)
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
            if not torch.isfinite(loss):
                raise DivergedError(f"loss is {loss.item()} at step {state.step + 1}; stopping. The last "
                                    "checkpoint holds the last good state")
            accelerator.backward(loss)
            if spec.grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item() / spec.grad_accum
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
