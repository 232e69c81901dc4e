"""Learning-rate multipliers: HF linear/constant, cosine with a floor, and ReLoRA's jagged cosine.

Section 5.3 trains ReLoRA and ReMoRA with "50 steps restarts warmup with optimizer resetting and
jagged scheduler" (Lialin et al. 2023). The jagged cosine is one global cosine envelope

    env(s) = ρ + (1 − ρ)·½(1 + cos(π·(s − w₀)/(S − w₀))),   ρ = min_lr_ratio, S = max_steps,

after a linear warm-up 0 → 1 over the first w₀ = warmup_steps steps. At each restart
s = m·T (T = restart_every, 1 ≤ m < S/T) the multiplier is exactly 0 and climbs linearly over
w = restart_warmup_steps steps to env(m·T + w), the envelope value at the END of the restart
warm-up (ReLoRA's choice; it makes the ramp land exactly on the envelope):

    λ(m·T + j) = (j / w)·env(m·T + w),   0 ≤ j < w.

``step`` is LambdaLR's counter: λ(s) is the multiplier of optimizer step s + 1, so the zero at
s = m·T is the rate of the first step after the merge that follows optimizer step m·T. There is
no restart at s = S (no merge happens there): λ(S) = ρ, the end of the envelope.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from mora.validation import check_choice, check_float, check_int

SCHEDULERS = ("linear", "cosine", "constant", "jagged_cosine")
_HF_NAMES = {"linear": "linear", "constant": "constant_with_warmup"}


def check_schedule(*, max_steps: int, warmup_steps: int, min_lr_ratio: float,
                   restart_every: int | None = None, restart_warmup_steps: int = 0) -> None:
    """Raise ValueError naming the argument if the (jagged) cosine schedule is ill-defined."""
    check_int("max_steps", max_steps)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_float("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
    if restart_every is None:
        return
    check_int("restart_every", restart_every)
    check_int("restart_warmup_steps", restart_warmup_steps)  # w = 0 would leave no zero to climb from
    if max_steps % restart_every:
        raise ValueError(f"restart_every={restart_every} must divide max_steps={max_steps} "
                         "(ReLoRA: every cycle has the same length)")
    if restart_warmup_steps >= restart_every:
        raise ValueError(f"restart_warmup_steps={restart_warmup_steps} must be < restart_every={restart_every}")
    if warmup_steps >= restart_every:
        raise ValueError(f"warmup_steps={warmup_steps} must be < restart_every={restart_every}: "
                         "the first restart would come before the first warm-up ends")


def cosine_envelope(step: int, *, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """ρ + (1 − ρ)·½(1 + cos(π·progress)), progress = (s − w₀)/(S − w₀) clamped to [0, 1].

    With ρ = 0 this is bit for bit transformers' cosine after its warm-up.
    """
    progress = float(step - warmup_steps) / float(max(1, max_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def jagged_cosine(step: int, *, max_steps: int, warmup_steps: int, restart_every: int | None,
                  restart_warmup_steps: int, min_lr_ratio: float) -> float:
    """ReLoRA's jagged cosine multiplier at LambdaLR step ``step`` (module docstring).

    ``restart_every=None``: no restarts, i.e. warm-up then cosine down to ``min_lr_ratio``.
    Call :func:`check_schedule` once first (:func:`build_scheduler` does).
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    envelope = partial(cosine_envelope, max_steps=max_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    if restart_every is not None and restart_every <= step < max_steps:
        cycle_start, into_cycle = step - step % restart_every, step % restart_every
        if into_cycle < restart_warmup_steps:
            return into_cycle / restart_warmup_steps * envelope(cycle_start + restart_warmup_steps)
    return envelope(step)


def build_scheduler(optimizer: Optimizer, name: str, *, max_steps: int, warmup_steps: int,
                    min_lr_ratio: float = 0.0, restart_every: int | None = None,
                    restart_warmup_steps: int = 0) -> LambdaLR:
    """The LambdaLR for ``name`` in SCHEDULERS.

    ``linear``/``constant`` are transformers' (constant keeps its warm-up) and take no floor;
    ``cosine`` is warm-up + cosine to ``min_lr_ratio`` (transformers' own when it is 0);
    ``jagged_cosine`` restarts every ``restart_every`` steps (None: no restarts, its envelope).
    """
    check_choice("scheduler", name, SCHEDULERS)
    if name != "jagged_cosine" and restart_every is not None:
        raise ValueError(f"restart_every={restart_every} needs scheduler='jagged_cosine', got {name!r}")
    if name in _HF_NAMES:
        if min_lr_ratio != 0.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} is defined for cosine and jagged_cosine, "
                             f"not scheduler={name!r}")
        return get_scheduler(_HF_NAMES[name], optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    kwargs = dict(max_steps=max_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                  restart_every=restart_every, restart_warmup_steps=restart_warmup_steps)
    check_schedule(**kwargs)
    return LambdaLR(optimizer, partial(jagged_cosine, **kwargs))
