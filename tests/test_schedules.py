"""The learning-rate schedules: ReLoRA's jagged cosine (Section 5.3) at its boundaries, its
envelope, its warm-ups and its argument checks; the old names unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_scheduler

from experiments.loop.schedules import build_scheduler, cosine_envelope, jagged_cosine

# 6 cycles of 20 steps, first warm-up 5, restart warm-up 4, floor 0.1
S, W0, T, W, RHO = 120, 5, 20, 4, 0.1
JAGGED = dict(max_steps=S, warmup_steps=W0, restart_every=T, restart_warmup_steps=W, min_lr_ratio=RHO)


def lam(step: int) -> float:
    return jagged_cosine(step, **JAGGED)


def plain_cosine(step: int) -> float:
    """Warm-up, then ρ + (1 − ρ)·½(1 + cos(π·progress)), written out from the definition."""
    if step < W0:
        return step / W0
    return RHO + (1 - RHO) * 0.5 * (1 + math.cos(math.pi * (step - W0) / (S - W0)))


def test_zero_at_every_restart_and_not_at_the_end():
    restarts = range(T, S, T)
    assert all(lam(s) == 0.0 for s in restarts)
    assert lam(S) == pytest.approx(RHO)  # no merge after the last step, so no restart there
    assert all(lam(s) > 0 for s in range(1, S + 1) if s not in restarts)


def test_restart_warmup_is_linear_and_lands_on_the_envelope():
    for start in range(T, S, T):
        target = plain_cosine(start + W)
        ramp = [lam(start + j) for j in range(W + 1)]
        assert ramp == pytest.approx([j / W * target for j in range(W + 1)], abs=1e-12)
        slopes = {round(b - a, 12) for a, b in zip(ramp, ramp[1:])}
        assert len(slopes) == 1 and ramp[0] == 0.0  # one straight line from 0 onto the envelope


def test_away_from_restarts_it_is_the_plain_cosine_with_its_floor():
    away = [s for s in range(S + 1) if s < T or s % T >= W]
    assert [lam(s) for s in away] == pytest.approx([plain_cosine(s) for s in away], abs=1e-12)
    assert lam(S) == pytest.approx(RHO, abs=1e-12)
    no_restarts = {**JAGGED, "restart_every": None}
    assert [jagged_cosine(s, **no_restarts) for s in range(S + 1)] == pytest.approx(
        [plain_cosine(s) for s in range(S + 1)], abs=1e-12)


def test_first_warmup_is_linear_from_zero():
    assert [lam(s) for s in range(W0 + 1)] == pytest.approx([s / W0 for s in range(W0 + 1)])
    assert lam(W0) == 1.0


def test_the_lambdalr_follows_the_multiplier():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(optimizer, "jagged_cosine", max_steps=S, warmup_steps=W0, min_lr_ratio=RHO,
                                restart_every=T, restart_warmup_steps=W)
    rates = []
    for _ in range(S):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate of this optimizer step
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.0 * lam(s) for s in range(S)])
    assert [i + 1 for i, r in enumerate(rates) if r == 0.0] == [1] + [m * T + 1 for m in range(1, S // T)]


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_old_names_keep_transformers_values(name):
    """min_lr_ratio = 0 reproduces what the loop used before (transformers' get_scheduler)."""
    def rates(scheduler_of):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = scheduler_of(optimizer)
        return [scheduler.lr_lambdas[0](s) for s in range(31)]

    hf = {"constant": "constant_with_warmup"}.get(name, name)
    ours = rates(lambda opt: build_scheduler(opt, name, max_steps=30, warmup_steps=4))
    assert ours == rates(lambda opt: get_scheduler(hf, opt, num_warmup_steps=4, num_training_steps=30))


def test_cosine_honours_the_floor():
    env = [cosine_envelope(s, max_steps=30, warmup_steps=0, min_lr_ratio=0.25) for s in range(31)]
    assert env[0] == 1.0 and env[-1] == pytest.approx(0.25) and min(env) == pytest.approx(0.25)
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = build_scheduler(torch.optim.SGD([param], lr=1.0), "cosine", max_steps=30, warmup_steps=0,
                                min_lr_ratio=0.25)
    assert [scheduler.lr_lambdas[0](s) for s in range(31)] == pytest.approx(env)


@pytest.mark.parametrize("change,argument", [
    (dict(restart_every=7), "restart_every"),                # does not divide 120
    (dict(restart_every=0), "restart_every"),
    (dict(restart_warmup_steps=20), "restart_warmup_steps"),  # not < restart_every
    (dict(restart_warmup_steps=0), "restart_warmup_steps"),   # nothing to climb from 0
    (dict(warmup_steps=20), "warmup_steps"),                  # not < restart_every
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(max_steps=0), "max_steps"),
])
def test_bad_arguments_are_named(change, argument):
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=argument):
        build_scheduler(torch.optim.SGD([param], lr=1.0), "jagged_cosine", **{**JAGGED, **change})


def test_bad_names_and_combinations():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="scheduler"):
        build_scheduler(optimizer, "cosine_restarts", max_steps=10, warmup_steps=0)
    with pytest.raises(ValueError, match="restart_every"):
        build_scheduler(optimizer, "cosine", max_steps=10, warmup_steps=0, restart_every=5)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(optimizer, "linear", max_steps=10, warmup_steps=0, min_lr_ratio=0.1)
