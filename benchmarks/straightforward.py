"""The straightforward MoRA: each operator as the paper writes it, the yardstick of `make bench`.

Written from the operator definitions (Section 4, Eq. 4, 6, 8, 9–11; Appendix B, Algorithms 1–2)
with the padding and truncation of :mod:`mora.operators` (inputs wrap-padded to a multiple of r̂,
block outputs truncated to d or tiled), so its outputs equal the library's to float precision
(tests/test_bench_straightforward.py). What makes it "straightforward":

* compression pads x (a copy) and sums a view (Algorithm 1, type 0);
* decompression concatenates and tiles (Algorithm 2, type 0), then adds the tiled Δx to W0 x;
* rotation (Eq. 9) rotates every input block x_i by its angles, then applies the one M;
* ΔW is built as the paper's picture of it: M tiled (Eq. 7), the block diagonal of P^i
  (Eq. 8–9, ``torch.block_diag``), the zero-padded corner (Eq. 5), then rows cut to d and the
  padded columns folded back onto the inputs they copy.

Only the default layout is covered: cyclic groups on both sides, wrap padding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mora.layer import MoRALinear


def pad_wrap(x: torch.Tensor, length: int) -> torch.Tensor:
    """x̃ (..., length): x followed by x again, cut to ``length`` (x̃_p = x_{p mod k})."""
    k = x.shape[-1]
    return torch.cat([x] * math.ceil(length / k), dim=-1)[..., :length]


def tile_to(y: torch.Tensor, d: int) -> torch.Tensor:
    """(..., m) -> (..., d): y repeated and truncated (Algorithm 2, type 0)."""
    return torch.cat([y] * math.ceil(d / y.shape[-1]), dim=-1)[..., :d]


def rotate_half(v: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half: (v_a, v_b) -> (−v_b, v_a) over the two halves of the last axis."""
    h = v.shape[-1] // 2
    return torch.cat([-v[..., h:], v[..., :h]], dim=-1)


def rotation_tables(r_hat: int, n_blocks: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, r̂) of the angles i·θ_t, θ_t = 10000^{-2t/r̂}, each θ used by a pair (Eq. 10–11)."""
    theta = 10000.0 ** (-torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)
    angles = torch.arange(n_blocks, dtype=torch.float64)[:, None] * theta.repeat(2)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def delta_x(x: torch.Tensor, M: torch.Tensor, operator: str, d: int, cos=None, sin=None) -> torch.Tensor:
    """f_decomp(M f_comp(x)) for x (..., k) -> (..., d) (Eq. 2)."""
    r, k = M.shape[0], x.shape[-1]
    if operator == "truncate":  # Eq. 4
        y = pad_wrap(x, max(k, r))[..., :r] @ M.T
        return y[..., :d] if d <= r else torch.cat([y, y.new_zeros(*y.shape[:-1], d - r)], dim=-1)
    n = math.ceil(k / r)
    blocks = pad_wrap(x, n * r).view(*x.shape[:-1], n, r)            # (..., n, r̂)
    if operator == "share":  # Eq. 6, Algorithm 1/2 type 0
        return tile_to(blocks.sum(-2) @ M.T, d)
    if operator == "rotate":  # Eq. 9–10: a^i = R_i x_i
        blocks = blocks * cos + rotate_half(blocks) * sin
    z = blocks @ M.T                                                  # (..., n, r̂), Eq. 8
    return tile_to(z.flatten(-2), d)


def fold_columns(delta: torch.Tensor, k: int) -> torch.Tensor:
    """(d, P ≥ k) over padded inputs -> (d, k): padded column p is added onto column p mod k."""
    out = delta[:, :k].clone()
    if delta.shape[1] > k:
        out.index_add_(1, torch.arange(k, delta.shape[1], device=delta.device) % k, delta[:, k:])
    return out


def delta_weight(M: torch.Tensor, operator: str, k: int, d: int, cos=None, sin=None) -> torch.Tensor:
    """ΔW = f_decomp(f_comp(M)) ∈ R^{d×k} (Eq. 3)."""
    r = M.shape[0]
    if operator == "truncate":  # Eq. 5
        corner = M.new_zeros(max(d, r), max(k, r))
        corner[:r, :r] = M
        return fold_columns(corner[:d], k)
    n = math.ceil(k / r)
    if operator == "share":  # Eq. 7: ΔW_ij = M[i mod r̂, j mod r̂]
        return fold_columns(M.repeat(math.ceil(d / r), n)[:d], k)
    if operator == "rotate":  # P^i = M R_i, column-wise M cos + (M with halves swapped) sin
        P = M * cos[:, None, :] + rotate_half(-M) * sin[:, None, :]   # (n, r̂, r̂)
    else:
        P = M.expand(n, r, r)
    diagonal = torch.block_diag(*P)                                   # (n r̂, n r̂), Eq. 8–9
    return fold_columns(tile_to(diagonal.T, d).T, k)


class StraightforwardMoRA(nn.Module):
    """h = W0 x + f_decomp(M f_comp(x)) with the straightforward operators; a copy of M."""

    def __init__(self, layer: MoRALinear):
        super().__init__()
        lay = layer.mora.layout
        if (lay.compress_groups, lay.decompress_groups, lay.padding) != ("cyclic", "cyclic", "wrap"):
            raise ValueError("the straightforward implementation covers cyclic groups and wrap padding only")
        self.base_layer, self.operator = layer.base_layer, lay.operator
        self.M = nn.Parameter(layer.mora.M.detach().clone())
        n_blocks = math.ceil(lay.in_features / lay.r_hat) if lay.operator == "rotate" else 0
        cos, sin = rotation_tables(lay.r_hat, n_blocks, self.M.dtype)
        self.register_buffer("cos", cos.to(self.M.device), persistent=False)
        self.register_buffer("sin", sin.to(self.M.device), persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output Δx (..., d) alone."""
        return delta_x(x, self.M, self.operator, self.base_layer.out_features, self.cos, self.sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)

    def delta_weight(self) -> torch.Tensor:
        k, d = self.base_layer.in_features, self.base_layer.out_features
        return delta_weight(self.M, self.operator, k, d, self.cos, self.sin)
