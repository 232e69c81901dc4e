"""ReLoRA / ReMoRA restarts (Section 5.3, Appendix B; Lialin et al. 2023), all in one place.

A restart, after every ``merge_every`` optimizer steps: merge ΔW into the base weight W, re-
initialise the adapter, switch MoRA's sharing groups (ReMoRA) and forget the adapter's optimizer
state. :class:`RestartConfig` holds the settings and is the one place they are validated;
:func:`check_restarts` checks them against the adapters they act on. The layers record what a
restart did to them in their own state (``base_weight_modified``, MoRA's ``groups``), so a
checkpoint needs no bookkeeping of its own.

Why ReMoRA switches groups: merging ΔW = f_decomp(f_comp(M)) with the same groups g, g' keeps
rank(Σ ΔW) ≤ r̂ (every ΔW lives in the same r̂-dimensional row and column spaces), so the groups
must change between merges (:data:`GROUP_SWITCHES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .adapters import AdapterConfig, adapter_layers, adapter_parameters, mora_layers
from .methods import METHODS, PEFT_ADAPTER
from .operators import OFFICIAL_MORA_TYPES
from .validation import check_choice, check_int

# ReMoRA's group switch after each merge, on (compress_groups, decompress_groups):
#   none    keep them (MoRA merged like ReLoRA: the accumulated rank cannot grow);
#   pair    cyclic ↔ block on both sides, the paper's type 0 ↔ 1 (official {1↔2});
#   cycle4  the official train.py default (remora_types=4): mora_type 1→2→3→4→1 over
#           cyclic/cyclic → block/block → block/cyclic → cyclic/block.
GROUP_SWITCHES = ("none", "pair", "cycle4")
CYCLE4_ORDER = tuple(OFFICIAL_MORA_TYPES[t][1:] for t in (1, 2, 3, 4))
_SWAP = {"cyclic": "block", "block": "cyclic"}


def next_groups(groups: tuple[str, str], switch: str) -> tuple[str, str]:
    """(compress_groups, decompress_groups) after one merge under ``switch`` (GROUP_SWITCHES)."""
    groups = tuple(groups)
    if switch == "none":
        return groups
    if switch == "pair":
        return _SWAP[groups[0]], _SWAP[groups[1]]
    return CYCLE4_ORDER[(CYCLE4_ORDER.index(groups) + 1) % len(CYCLE4_ORDER)]


@dataclass(frozen=True)
class RestartConfig:
    """When and how a method restarts; the defaults: never. Validated on construction.

    The fields are the method's config fields (``conf/method/relora.yaml``), so errors name them
    ``method.<field>``.

    Args:
        merge_every: restart after every ``merge_every``-th optimizer step (None: never).
        group_switch: how MoRA's sharing groups change at each restart (:data:`GROUP_SWITCHES`).
        jagged_schedule: ReLoRA's jagged cosine: the learning rate drops to 0 at each restart and
            warms up again over ``restart_warmup_steps`` steps.
        restart_warmup_steps: that re-warm-up (the paper: 50), used by the jagged schedule.
    """

    merge_every: int | None = None
    group_switch: str = "none"
    jagged_schedule: bool = False
    restart_warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_int("method.merge_every", self.merge_every, allow_none=True)
        check_choice("method.group_switch", self.group_switch, GROUP_SWITCHES)
        check_choice("method.jagged_schedule", self.jagged_schedule, (False, True))
        check_int("method.restart_warmup_steps", self.restart_warmup_steps, minimum=0)
        if self.merge_every is None and (self.group_switch != "none" or self.jagged_schedule):
            raise ValueError(f"method.group_switch={self.group_switch!r} and method.jagged_schedule="
                             f"{self.jagged_schedule} act at restarts: set method.merge_every")
        if self.jagged_schedule and not 1 <= self.restart_warmup_steps < self.merge_every:
            raise ValueError(f"method.restart_warmup_steps={self.restart_warmup_steps} must lie in [1, "
                             f"method.merge_every={self.merge_every}) under the jagged schedule: the "
                             "learning rate climbs back from zero within each cycle")

    @property
    def enabled(self) -> bool:
        return self.merge_every is not None

    def restart_after(self, step: int, max_steps: int) -> bool:
        """Whether optimizer step ``step`` (1-based) ends a cycle; never after the last step."""
        return self.enabled and step % self.merge_every == 0 and step < max_steps


def check_restarts(restarts: RestartConfig, adapter: AdapterConfig) -> None:
    """Refuse restart settings that the adapters cannot carry out (errors name the field)."""
    method = METHODS[adapter.method]
    if restarts.enabled and not method.restarts:
        restarting = sorted(n for n, m in METHODS.items() if m.restarts)
        raise ValueError(f"method.merge_every={restarts.merge_every}: method={adapter.method!r} does not "
                         f"merge and restart its adapters (methods that do: {restarting})")
    if restarts.group_switch != "none" and (method.layer_kind != "mora" or adapter.operator != "share"):
        raise ValueError(f"method.group_switch={restarts.group_switch!r} switches MoRA's sharing groups "
                         f"(Eq. 6); method={adapter.method!r} with operator={adapter.operator!r} has none "
                         "(use method.group_switch=none or method.operator=share)")


# ----------------------------------------------------------------------------- merge and re-init

@torch.no_grad()
def merge_and_reinit(model: nn.Module, groups: tuple[str, str] | None = None) -> None:
    """ReLoRA / ReMoRA restart at layer level, in every adapter layer of ``model``.

    LoRA layers: W ← W + (α/r)·BA, then A ← Kaiming-uniform(a=√5), B ← 0 (same Parameter objects,
    so the optimizer keeps them). MoRA layers: W ← W + ΔW, M ← 0, and ``groups`` =
    (compress_groups, decompress_groups) sets a new sharing layout (None keeps it). Each layer
    sets its ``base_weight_modified`` flag: its base weight is now trained state.
    """
    for layer in adapter_layers(model).values():
        if isinstance(layer, LoraLayer):
            _lora_merge_and_reinit(layer)
        else:
            layer.merge_and_reinit(groups)


def _lora_merge_and_reinit(layer: LoraLayer) -> None:
    if layer.use_dora.get(PEFT_ADAPTER, False):
        raise ValueError("merge_and_reinit is defined for LoRA (ReLoRA), not for DoRA layers")
    delta = layer.get_delta_weight(PEFT_ADAPTER)
    if not torch.isfinite(delta).all():
        raise FloatingPointError("LoRA ΔW holds NaN/inf; refusing to write it into the base weight")
    weight = layer.get_base_layer().weight
    weight.add_(delta.to(weight.dtype))
    layer.base_weight_modified.fill_(True)
    nn.init.kaiming_uniform_(layer.lora_A[PEFT_ADAPTER].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[PEFT_ADAPTER].weight)


# ----------------------------------------------------------------------------- the whole restart

def restart_adapters(model: nn.Module, optimizer: torch.optim.Optimizer, group_switch: str = "none") -> None:
    """ReLoRA/ReMoRA restart: merge ΔW into W, re-init the adapters, switch MoRA's groups
    (``group_switch``), reset the adapters' optimizer state."""
    merge_and_reinit(model, _switched_groups(model, group_switch))
    reset_adapter_optimizer_state(model, optimizer)


def _switched_groups(model: nn.Module, group_switch: str) -> tuple[str, str] | None:
    """The sharing groups every MoRA layer takes at this restart (None: leave them)."""
    current = {(l.mora.layout.compress_groups, l.mora.layout.decompress_groups)
               for l in mora_layers(model).values()}
    if group_switch == "none" or not current:
        return None
    if len(current) > 1:
        raise RuntimeError(f"MoRA layers disagree on their sharing groups {sorted(current)}; "
                           "cannot switch them together")
    return next_groups(current.pop(), group_switch)


def reset_adapter_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Forget the optimizer state (Adam's moments and step) of the adapter parameters only.

    ReLoRA resets the optimizer at each merge for the adapters alone: the moments of the old A, B
    (or M) describe a ΔW that now lives in W. Embeddings, norms, lm_head and any other trainable
    parameter keep theirs. State is keyed by Parameter, so param groups (LoRA+) need no care;
    accelerate's AcceleratedOptimizer keeps the state on the optimizer it wraps.
    """
    state = getattr(optimizer, "optimizer", optimizer).state
    for param in adapter_parameters(model):
        state.pop(param, None)
