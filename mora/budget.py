"""Rank as a parameter budget (Section 4).

``rank=r`` means "LoRA's trainable-parameter count at rank r", i.e. (d + k)·r for a d×k weight.
MoRA spends the same budget on one square matrix M ∈ R^{r̂×r̂}. The paper writes
r̂ = ⌊√((d + k)·r)⌋; the official code (which produced the paper's numbers) rounds to the nearest
integer instead, ``int(√((d + k)·r) + 0.5)``, and for rotation (Eq. 9) rounds down to an even r̂
because RoPE rotates pairs. Nearest rounding can exceed LoRA's count by ≈ 1/r̂ (0.4% at r̂ = 256).
"""

from __future__ import annotations

import math

from .validation import check_choice, check_int

ROUNDINGS = ("nearest", "floor")


def lora_parameter_count(in_features: int, out_features: int, rank: int) -> int:
    """Trainable parameters of LoRA's A ∈ R^{r×k} and B ∈ R^{d×r} (Eq. 1)."""
    return (in_features + out_features) * rank


def mora_r_hat(in_features: int, out_features: int, rank: int, rounding: str = "nearest",
               even: bool = False) -> int:
    """Side r̂ of MoRA's square matrix for a d×k weight at LoRA-equivalent rank ``rank``.

    ``rounding="nearest"`` follows the official code (default), ``"floor"`` the paper's formula,
    which never exceeds LoRA's count. ``even=True`` (needed by rotation) rounds r̂ down to even.
    """
    check_int("rank", rank)
    check_choice("rounding", rounding, ROUNDINGS)
    budget = lora_parameter_count(in_features, out_features, rank)
    r_hat = math.isqrt(budget) if rounding == "floor" else int(math.sqrt(budget) + 0.5)
    if even:
        r_hat = r_hat // 2 * 2
    if r_hat < (2 if even else 1):
        raise ValueError(f"rank={rank} gives r̂={r_hat} for a {out_features}×{in_features} weight; "
                         "increase rank")
    return r_hat
