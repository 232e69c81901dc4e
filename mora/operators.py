"""MoRA's non-parameter compress/decompress operators (Section 4, Eq. 2–11; Appendix B).

Notation follows the paper: the frozen weight is W0 ∈ R^{d×k} (``out_features`` d,
``in_features`` k) and MoRA trains one square M ∈ R^{r̂×r̂} with

    h = W0 x + f_decomp(M f_comp(x))                                         (Eq. 2)
    f_decomp(M f_comp(x)) = ΔW x,  ΔW = f_decomp(f_comp(M))                   (Eq. 3)

Four named operators, each a pair (f_comp, f_decomp):

* ``truncate`` (Eq. 4–5): keep the first r̂ inputs, write the first r̂ outputs.
* ``share`` (Eq. 6–7): sum the inputs of each group g_i, copy y_i to every output of group g'_i.
  Group layouts, chosen independently for the input and the output side (Appendix B):
  ``cyclic`` — feature j belongs to group j mod r̂ (Algorithm 1/2 "type 0": ``view(k/r̂, r̂).sum``
  and ``repeat``); ``block`` — contiguous groups whose sizes differ by at most one, the first
  (k mod r̂) one larger (Algorithm 1/2 "type 1": ``view(r̂, k/r̂).sum`` and ``repeat_interleave``).
  The paper also calls these "adjacent" groupings in both places, which is ambiguous, so this code
  names them by what they do. The official ``mora_type`` codes are (cyclic, cyclic) = 1,
  (block, block) = 2, (block, cyclic) = 3, (cyclic, block) = 4.
* ``decouple`` (Eq. 8): cut the (padded) input into n = ⌈k/r̂⌉ blocks, apply M to each, concatenate.
* ``rotate`` (Eq. 9–11): as decouple, but block i is first rotated RoPE-style by angles i·θ_j,
  θ_j = 10000^{-2(j-1)/r̂}, pairing coordinates t and t + r̂/2 ("rotate-half", as the official
  code); block 0 is therefore unrotated (official ``mora_type`` 6).

Where the paper is silent (Section 4 "omits padding and truncation") we follow the official code:
inputs are padded by wrapping around (x̃_p = x_{p mod k}; ``zero`` as an option), the concatenated
outputs of decouple/rotate are truncated to d or tiled when shorter than d (output i reads
concatenated position i mod nr̂). Known quirks kept for fidelity: with rotation/decouple and
k > d, only the first ⌈d/r̂⌉ input blocks reach the output, so the other inputs have no effect on
ΔW (we skip computing them); with d < r̂ the rows of M past d are never used.

Everything here is a pure function of tensors; shapes are documented as (..., features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .validation import check_choice, check_int

OPERATORS = ("truncate", "share", "decouple", "rotate")
GROUP_KINDS = ("cyclic", "block")
PADDINGS = ("wrap", "zero")

# Official ``mora_type`` integers -> (operator, compress_groups, decompress_groups).
OFFICIAL_MORA_TYPES = {
    1: ("share", "cyclic", "cyclic"),
    2: ("share", "block", "block"),
    3: ("share", "block", "cyclic"),
    4: ("share", "cyclic", "block"),
    6: ("rotate", "cyclic", "cyclic"),
}


@dataclass(frozen=True)
class MoRALayout:
    """Shapes and named operator choices of one MoRA adapter (validated on construction)."""

    in_features: int
    out_features: int
    r_hat: int
    operator: str = "share"
    compress_groups: str = "cyclic"
    decompress_groups: str = "cyclic"
    padding: str = "wrap"

    def __post_init__(self) -> None:
        check_choice("operator", self.operator, OPERATORS)
        check_choice("compress_groups", self.compress_groups, GROUP_KINDS)
        check_choice("decompress_groups", self.decompress_groups, GROUP_KINDS)
        check_choice("padding", self.padding, PADDINGS)
        for name in ("in_features", "out_features", "r_hat"):
            check_int(name, getattr(self, name))
        if self.operator == "rotate" and self.r_hat % 2:
            raise ValueError(f"operator='rotate' rotates coordinate pairs and needs an even r_hat, "
                             f"got r_hat={self.r_hat}")

    @property
    def n_blocks(self) -> int:
        """n = ⌈k/r̂⌉ input blocks of decouple/rotate (Eq. 8)."""
        return math.ceil(self.in_features / self.r_hat)

    @property
    def n_used_blocks(self) -> int:
        """Blocks whose outputs reach one of the d outputs; the rest cannot affect ΔW."""
        return min(self.n_blocks, math.ceil(self.out_features / self.r_hat))


# ----------------------------------------------------------------------------- padding

def padded_sources(in_features: int, start: int, length: int, padding: str) -> torch.Tensor:
    """Source feature of padded positions start … start+length-1 (−1 where zero-padded)."""
    positions = torch.arange(start, start + length)
    if padding == "wrap":
        return positions % in_features
    return torch.where(positions < in_features, positions, -1)


def add_wrapped(target: torch.Tensor, wrapped: torch.Tensor) -> None:
    """target[..., p mod k] += wrapped[..., p − k] for the wrapped padded positions p = k, k+1, … (k: target's
    last size), in place. A single wrap adds onto the first columns as one contiguous slice; index_add_ only where
    the padding is wider than the input (several wraps): it has no vectorised bfloat16 path on CPUs, where it made
    a sharing ΔW 3.7× a copy of W."""
    k, n = target.shape[-1], wrapped.shape[-1]
    if n <= k:
        target[..., :n] += wrapped
    else:
        target.index_add_(-1, padded_sources(k, k, n, "wrap").to(target.device), wrapped)


def padded_slice(x: torch.Tensor, start: int, length: int, padding: str) -> torch.Tensor:
    """x̃[..., start:start+length] of the padded input without materialising all of x̃."""
    k = x.shape[-1]
    inside = x[..., start:min(k, start + length)]
    n_pad = length - inside.shape[-1]
    if n_pad == 0:
        return inside
    if padding == "wrap" and start + length <= 2 * k:  # one wrap: x̃_p = x_{p − k}, a slice (no index kernels)
        pad = x[..., max(start, k) - k:start + length - k]
    elif padding == "wrap":  # x̃_p = x_{p mod k}: wraps more than once when k is small
        src = torch.arange(max(start, k), start + length, device=x.device) % k
        pad = x.index_select(-1, src)
    else:
        pad = x.new_zeros(*x.shape[:-1], n_pad)
    return torch.cat([inside, pad], dim=-1)


def fold_padded_columns(delta_padded: torch.Tensor, in_features: int, padding: str) -> torch.Tensor:
    """Map a ΔW̃ over padded input positions (d, P) back onto the k real inputs (d, k).

    A wrapped position p reads feature p mod k, so its column is added onto that feature's;
    zero-padded positions read nothing and are dropped.
    """
    d, n_positions = delta_padded.shape
    if n_positions <= in_features:
        delta = delta_padded.new_zeros(d, in_features)
        delta[:, :n_positions] = delta_padded
        return delta
    delta = delta_padded[:, :in_features].clone()
    if padding == "wrap":
        add_wrapped(delta, delta_padded[:, in_features:])
    return delta


# ----------------------------------------------------------------------------- groups

def block_groups(n_features: int, r_hat: int) -> torch.Tensor:
    """Group of each feature for contiguous groups, sizes ⌈n/r̂⌉ first then ⌊n/r̂⌋ (n,)."""
    q, m = divmod(n_features, r_hat)
    j = torch.arange(n_features)
    n_big = m * (q + 1)
    return torch.where(j < n_big, j // (q + 1), m + (j - n_big) // max(q, 1))


# How the operators are differentiated on a GPU: "functions" (this module's autograd.Functions, whose Python
# backward avoids the whole-output clones and saved copies of torch's own: the choice on a CPU, where a step
# is memory traffic) or "plain" (torch's own backward of the same forward ops: no Python in the backward,
# which a GPU step of one projection, launch- and host-bound, may prefer). `make bench` on CUDA times both
# (bench_adapters.py --gpu-autograd).
GPU_AUTOGRAD = "functions"
GPU_AUTOGRAD_CHOICES = ("functions", "plain")


def _plain_autograd(t: torch.Tensor) -> bool:
    """Differentiate through torch's own backward (see GPU_AUTOGRAD)."""
    return t.is_cuda and GPU_AUTOGRAD == "plain"


def compress_cyclic(x: torch.Tensor, r_hat: int, padding: str) -> torch.Tensor:
    """(..., k) -> (..., r̂): c_i = Σ_{p ≡ i mod r̂} x̃_p over the padded length ⌈k/r̂⌉·r̂ (Eq. 6)."""
    if _plain_autograd(x):
        return _compress_cyclic(x, r_hat, padding)
    return _CompressCyclic.apply(x, r_hat, padding)


class _CompressCyclic(torch.autograd.Function):
    """compress_cyclic with a one-buffer backward: ∂x_j = ∂c_{j mod r̂} (+ the wrapped positions).

    Autograd's own backward of the slices/cat/index_select builds a zero-filled (..., k) buffer
    per piece and sums them; here the gradient is one tiled buffer, folded in place.
    """

    @staticmethod
    def forward(ctx, x, r_hat, padding):
        ctx.k, ctx.padding = x.shape[-1], padding
        return _compress_cyclic(x, r_hat, padding)

    @staticmethod
    def backward(ctx, grad_c):
        k, r_hat = ctx.k, grad_c.shape[-1]
        n_positions = math.ceil(k / r_hat) * r_hat
        grad_padded = grad_c.repeat(*([1] * (grad_c.dim() - 1)), n_positions // r_hat)
        grad_x = grad_padded[..., :k]
        if n_positions > k and ctx.padding == "wrap":
            add_wrapped(grad_x, grad_padded[..., k:])
        return grad_x, None, None


def _compress_cyclic(x: torch.Tensor, r_hat: int, padding: str) -> torch.Tensor:
    q, rem = divmod(x.shape[-1], r_hat)
    tail = padded_slice(x, q * r_hat, r_hat, padding) if rem else None
    if q == 0:
        return tail
    c = x[..., :q * r_hat].unflatten(-1, (q, r_hat)).sum(-2)  # (..., r̂)
    return c if tail is None else c.add_(tail)


def compress_block(x: torch.Tensor, r_hat: int) -> torch.Tensor:
    """(..., k) -> (..., r̂): sums over contiguous groups, the first k mod r̂ one larger (Eq. 6)."""
    q, m = divmod(x.shape[-1], r_hat)
    n_big = m * (q + 1)
    big = x[..., :n_big].unflatten(-1, (m, q + 1)).sum(-1)            # (..., m)
    small = x[..., n_big:].unflatten(-1, (r_hat - m, q)).sum(-1)      # (..., r̂ - m)
    return torch.cat([big, small], dim=-1)


def add_periodic(out: torch.Tensor, z: torch.Tensor, offset: int, period: int) -> torch.Tensor:
    """In place: out[..., i] += ẑ[(i mod period) − offset]; see :func:`_add_periodic`.

    Wrapped in an autograd.Function: autograd's own backward of in-place adds into views of
    ``out`` (CopySlices) clones the whole output gradient for every add; here ∂out passes
    through untouched and ∂z is a sum of strided views of it.
    """
    if not (torch.is_grad_enabled() and (out.requires_grad or z.requires_grad)) or _plain_autograd(z):
        return _add_periodic(out, z, offset, period)
    return _AddPeriodic.apply(out, z, offset, period)


class _AddPeriodic(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, z, offset, period):
        ctx.mark_dirty(out)
        ctx.z_shape, ctx.offset, ctx.period = z.shape, offset, period
        return _add_periodic(out, z, offset, period)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[1]:
            return grad_out, None, None, None
        return grad_out, _sum_periodic(grad_out, ctx.z_shape, ctx.offset, ctx.period), None, None


def _sum_periodic(grad_out: torch.Tensor, z_shape: torch.Size, offset: int, period: int) -> torch.Tensor:
    """Adjoint of _add_periodic: ∂z = Σ over the tiles of ∂out that z was added into.

    ∂z is built flat over its blocks, so the whole tiles are one reduction and the last, partial tile one
    add: two kernels whatever the shape (a GPU step at these sizes costs per kernel launched).
    """
    d = grad_out.shape[-1]
    n_blocks, block = z_shape[-2:]
    span = n_blocks * block
    n_full, rem = divmod(d, period)
    if n_full:
        tiles = grad_out[..., :n_full * period].unflatten(-1, (n_full, period))
        grad_z = tiles[..., offset:offset + span].sum(-2)                          # (..., span), a new tensor
    else:
        grad_z = grad_out.new_zeros(*grad_out.shape[:-1], span)
    width = min(span, rem - offset)
    if width > 0:
        start = n_full * period + offset
        grad_z[..., :width] += grad_out[..., start:start + width]
    return grad_z.unflatten(-1, (n_blocks, block)).sum_to_size(z_shape)


def _add_periodic(out: torch.Tensor, z: torch.Tensor, offset: int, period: int) -> torch.Tensor:
    """In place: out[..., i] += ẑ[(i mod period) − offset] where ẑ = z flattened over blocks.

    ``z`` is (..., n_blocks, block) and may be a strided view (no copy is made). With
    period ≥ d this writes z once at ``offset`` (truncate, or decouple truncated to d); with a
    smaller period it tiles (share's cyclic decompression, decouple shorter than d).
    """
    d = out.shape[-1]
    n_blocks, block = z.shape[-2:]
    span = n_blocks * block
    n_full, rem = divmod(d, period)
    if n_full:
        tiles = out[..., :n_full * period].unflatten(-1, (n_full, period))
        tiles[..., offset:offset + span].unflatten(-1, (n_blocks, block)).add_(z.unsqueeze(-3))
    width = min(span, rem - offset)  # the last, partial tile
    if width > 0:
        start = n_full * period + offset
        if z.stride(-1) == 1 and (n_blocks == 1 or z.stride(-2) == block):  # blocks back to back: one add
            out[..., start:start + width].add_(z.flatten(-2)[..., :width])
            return out
        whole, part = divmod(width, block)
        if whole:
            out[..., start:start + whole * block].unflatten(-1, (whole, block)).add_(z[..., :whole, :])
        if part:
            out[..., start + whole * block:start + width].add_(z[..., whole, :part])
    return out


def add_interleaved(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """In place: out[..., i] += y[..., group(i)] for contiguous output groups (Eq. 6, block)."""
    r_hat = y.shape[-1]
    q, m = divmod(out.shape[-1], r_hat)
    n_big = m * (q + 1)
    if m:
        out[..., :n_big].unflatten(-1, (m, q + 1)).add_(y[..., :m, None])
    if q:
        out[..., n_big:].unflatten(-1, (r_hat - m, q)).add_(y[..., m:, None])
    return out


# ----------------------------------------------------------------------------- rotation

def rotation_tables(r_hat: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angles i·θ_t for blocks i < n_blocks, float32 (n_blocks, r̂) (Eq. 10–11).

    θ_t = 10000^{-2t/r̂} for t < r̂/2, repeated for the partner coordinate t + r̂/2.
    """
    theta = 10000.0 ** (-torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)  # (r̂/2,)
    angles = torch.outer(torch.arange(n_blocks, dtype=torch.float64), theta)       # (n, r̂/2)
    angles = torch.cat([angles, angles], dim=-1)                                  # (n, r̂)
    return angles.cos().float(), angles.sin().float()


def rotated_blocks(M: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """P^i = M R_i for every block i (Eq. 10): (r̂, r̂) -> (n, r̂, r̂), in M's dtype.

    With rotate-half, (R v)_t = v_t cos − v_{t+h} sin and (R v)_{t+h} = v_{t+h} cos + v_t sin, so
    column t of M R is M_t cos + M_{t+h} sin and column t+h is M_{t+h} cos − M_t sin. Cost n·r̂²,
    independent of the number of tokens. Computed at the wider of M's and the tables' precision
    (float32 for a bfloat16 M) and rounded once; ``out`` (n, r̂, r̂), any strides, receives it.
    """
    h = M.shape[-1] // 2

    def half_swapped(A: torch.Tensor) -> torch.Tensor:  # columns (A_{t+h}, −A_t): what sin multiplies
        return torch.cat([A[:, h:], -A[:, :h]], dim=-1)

    cos, sin = cos[:, None, :], sin[:, None, :]                                     # (n, 1, r̂)
    differentiable = torch.is_grad_enabled() and M.requires_grad
    dtype = torch.promote_types(M.dtype, cos.dtype)
    if out is not None and not differentiable:
        if out.dtype == dtype:
            return torch.mul(M, cos, out=out).addcmul_(half_swapped(M), sin)        # written in place
        # narrower out (bfloat16 M, float32 tables): rows of M in chunks of ~512 KiB at the wider precision, each
        # rounded once into out while it is in cache: whole-matrix temporaries made the bfloat16 merge ΔW >3x a
        # copy of W (memory traffic, not arithmetic). Elementwise, so bitwise the same as the unchunked formula.
        rows = max(1, (1 << 19) // (dtype.itemsize * cos.shape[0] * M.shape[-1]))
        for start in range(0, M.shape[0], rows):
            block = M[start:start + rows]                                           # (rows, r̂)
            out[:, start:start + rows].copy_(torch.mul(block, cos).addcmul_(half_swapped(block), sin))
        return out
    P = torch.addcmul(M.to(dtype) * cos, half_swapped(M).to(dtype), sin).to(M.dtype)
    return P if out is None else out.copy_(P)


def _rotated_blocks_adjoint(grad_P: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """∂M from ∂P^i (n, r̂, r̂) through P^i = M R_i: Σ_i ∂P^i R_iᵀ, i.e. Σ_i ∂P^i cos_i + rot(Σ_i ∂P^i sin_i)."""
    dtype = torch.promote_types(grad_P.dtype, cos.dtype)
    g = grad_P.to(dtype)
    by_cos = (g * cos.to(dtype)[:, None, :]).sum(0)                     # (r̂, r̂)
    by_sin = (g * sin.to(dtype)[:, None, :]).sum(0)
    h = by_sin.shape[-1] // 2
    return by_cos.add_(torch.cat([-by_sin[:, h:], by_sin[:, :h]], dim=-1)).to(grad_P.dtype)


# ----------------------------------------------------------------------------- Δx and ΔW

def add_mora_update(out: torch.Tensor, x: torch.Tensor, M: torch.Tensor, layout: MoRALayout,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """In place: out (..., d) += f_decomp(M f_comp(x)) for x (..., k) (Eq. 2); returns out.

    ``cos``/``sin`` are the tables of :func:`rotation_tables` (rotate only). Computes in M's dtype.
    """
    x = x.to(M.dtype)
    if layout.operator == "truncate":
        c = padded_slice(x, 0, layout.r_hat, layout.padding)                 # (..., r̂)
        y = c @ M.T
        return add_periodic(out, y.unsqueeze(-2).to(out.dtype), 0, max(layout.out_features, layout.r_hat))
    if layout.operator == "share":
        c = (compress_cyclic(x, layout.r_hat, layout.padding) if layout.compress_groups == "cyclic"
             else compress_block(x, layout.r_hat))                            # (..., r̂)
        y = (c @ M.T).to(out.dtype)                                          # (..., r̂)
        if layout.decompress_groups == "cyclic":
            return add_periodic(out, y.unsqueeze(-2), 0, layout.r_hat)
        return add_interleaved(out, y)
    return _add_blockwise(out, x, M, layout, cos, sin)


def _block_matrices(M: torch.Tensor, layout: MoRALayout, cos: torch.Tensor | None,
                    sin: torch.Tensor | None) -> torch.Tensor:
    """(n_used, r̂, r̂): M for every used block (decouple, a broadcast view) or P^i = M R_i (rotate)."""
    n = layout.n_used_blocks
    if layout.operator == "decouple":
        return M.expand(n, *M.shape)
    return rotated_blocks(M, cos[:n], sin[:n])


def _add_blockwise(out: torch.Tensor, x: torch.Tensor, M: torch.Tensor, layout: MoRALayout,
                   cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """decouple/rotate: out += concat_i(P^i x̃_i) truncated or tiled to d (Eq. 8–9); see _AddBlockwise."""
    if not (torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or M.requires_grad)):
        return _blockwise_update(out, x, M, layout, cos, sin)
    if _plain_autograd(x):
        return _blockwise_update_plain(out, x, M, layout, cos, sin)
    return _AddBlockwise.apply(out, x, M, cos, sin, layout)


def _blockwise_update_plain(out: torch.Tensor, x: torch.Tensor, M: torch.Tensor, layout: MoRALayout,
                            cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """_AddBlockwise's shared-matrix forward in differentiable ops (GPU_AUTOGRAD = "plain"): the padded
    blocks (one cat), rotated out of place, one GEMM with M, added into out; torch saves the blocks."""
    r, n = layout.r_hat, layout.n_used_blocks
    blocks = padded_slice(x.reshape(-1, layout.in_features), 0, n * r, layout.padding).unflatten(-1, (n, r))
    if layout.operator == "rotate":  # R_i v = v cos + (−v_{t+h}, v_t) sin, the tables' precision, rounded once
        h = r // 2
        swapped = torch.cat([-blocks[..., h:], blocks[..., :h]], dim=-1)
        blocks = (blocks * cos[:n] + swapped * sin[:n]).to(blocks.dtype)
    z = (blocks @ M.T).view(*x.shape[:-1], n, r)                                    # (..., n, r̂)
    return _add_periodic(out, z.to(out.dtype), 0, layout.n_blocks * r)


class _AddBlockwise(torch.autograd.Function):
    """out += Eq. 8–9 with a backward that keeps only x (as LoRA keeps x) and M.

    Two ways to run it. The stack: a batched GEMM of each block's matrix (M for decoupling, the
    rotated P^i = M R_i for rotation) with that block of x, read in place, and ∂M from the n block
    gradients (n·r̂² entries) summed. The shared matrix: one GEMM of all T·n input blocks, as rows,
    with M, and ∂M as one GEMM; the blocks must be laid out as rows (a copy of T·n·r̂ entries,
    rotated for rotation, padded), unless they are x itself. Each costs what the other saves, so
    the shared matrix is taken when its blocks are x itself (decoupling with n·r̂ = k, as
    LLaMA's 4096→4096 at r = 8: no copy at all), or when the step has at most r̂ tokens (T·n·r̂
    ≤ n·r̂²). Neither P nor the rotated or padded blocks are saved: they are recomputed in the
    backward, so the activation memory is x alone.
    When the blocks cover the output exactly (n·r̂ = d, LLaMA's 4096→4096 at r = 8), the GEMM
    accumulates straight into out and ∂z is a view of ∂out: no (T, d) temporary either way.
    """

    @staticmethod
    def forward(ctx, out, x, M, cos, sin, layout):
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, M, cos, sin)
        ctx.layout = layout
        ctx.shared_matrix = _shared_matrix(layout, x.numel() // layout.in_features, x.is_cuda)
        return _blockwise_update(out, x, M, layout, cos, sin)

    @staticmethod
    def backward(ctx, grad_out):
        x, M, cos, sin = ctx.saved_tensors
        layout = ctx.layout
        r, k, n = layout.r_hat, layout.in_features, layout.n_used_blocks
        x2 = x.reshape(-1, k)                                                       # (T, k)
        T = x2.shape[0]
        if _covers_output(grad_out, layout):
            grad_z = grad_out.view(T, n, r)
        else:
            grad_z = _sum_periodic(grad_out.reshape(T, -1), torch.Size((T, n, r)), 0, layout.n_blocks * r)
        grad_z = grad_z.to(M.dtype)
        grad_x = grad_M = None
        if ctx.shared_matrix:
            cos, sin = _tables(layout, cos, sin)
            if ctx.needs_input_grad[1]:  # ∂x̃_i = R_iᵀ Mᵀ ∂z_i (R_i = I when decoupling)
                grad_x = _blocks_to_columns(grad_z @ M, layout, cos, sin)
            if ctx.needs_input_grad[2]:  # ∂M = Σ ∂z_i a_iᵀ, a recomputed
                grad_M = grad_z.flatten(0, 1).T @ _input_blocks(x2, layout, cos, sin).flatten(0, 1)
        else:
            P = _block_matrices(M, layout, cos, sin)
            grad_z = grad_z.transpose(0, 1)                                         # (n, T, r̂)
            if ctx.needs_input_grad[1]:  # ∂x̃_i = P^iᵀ ∂z_i
                grad_x = _blocks_to_columns(torch.bmm(grad_z, P).transpose(0, 1), layout)
            if ctx.needs_input_grad[2]:
                grad_P = _blockwise_grad_P(grad_z, x2, layout)                      # (n, r̂, r̂)
                grad_M = grad_P.sum(0) if layout.operator == "decouple" else _rotated_blocks_adjoint(
                    grad_P, cos[:n], sin[:n])
        return grad_out, None if grad_x is None else grad_x.view(x.shape), grad_M, None, None, None


def _blockwise_update(out: torch.Tensor, x: torch.Tensor, M: torch.Tensor, layout: MoRALayout,
                      cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """The forward of _AddBlockwise: the one M on all input blocks (decouple; rotate with the inputs
    rotated) or the stack of block matrices (rotate, M rotated), whichever is cheaper."""
    x2 = x.reshape(-1, layout.in_features)                                         # (T, k)
    if not _shared_matrix(layout, x2.shape[0], x2.is_cuda):
        return _blockwise_forward(out, x, _block_matrices(M, layout, cos, sin), layout)
    a = _input_blocks(x2, layout, *_tables(layout, cos, sin)).flatten(0, 1)        # (T·n, r̂)
    if _covers_output(out, layout) and out.dtype == a.dtype:
        out.view(-1, layout.r_hat).addmm_(a, M.T)
        return out
    z = (a @ M.T).view(*x.shape[:-1], layout.n_used_blocks, layout.r_hat)           # (..., n, r̂)
    return _add_periodic(out, z.to(out.dtype), 0, layout.n_blocks * layout.r_hat)


def _covers_output(out: torch.Tensor, layout: MoRALayout) -> bool:
    """The used blocks tile the output exactly once (n·r̂ = d), and out is contiguous."""
    return layout.n_used_blocks * layout.r_hat == layout.out_features and out.is_contiguous()


def _rotate_inputs(layout: MoRALayout, n_tokens: int) -> bool:
    """Rotate the T·n·r̂ input entries rather than the n·r̂² entries of P when that is fewer."""
    return layout.operator == "rotate" and n_tokens <= layout.r_hat


def _shared_matrix(layout: MoRALayout, n_tokens: int, on_gpu: bool = False) -> bool:
    """One GEMM of all input blocks with M (see _AddBlockwise): rotation when it rotates the inputs;
    decoupling when its blocks are x itself or the step has at most r̂ tokens. Always on a GPU: there a
    step of one projection is launch-bound (an H200 multiplies 4096×4096 by 2,048 bfloat16 tokens in
    tens of microseconds), the copy of the blocks is cheap, and the shared matrix launches the fewest
    kernels (benchmarks/count_ops.py)."""
    if on_gpu:
        return True
    if layout.operator == "rotate":
        return _rotate_inputs(layout, n_tokens)
    return layout.n_used_blocks * layout.r_hat == layout.in_features or n_tokens <= layout.r_hat


def _tables(layout: MoRALayout, cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple:
    """The rotation tables where blocks are rotated, else (None, None): R_i = I when decoupling."""
    return (cos, sin) if layout.operator == "rotate" else (None, None)


def _full_blocks(layout: MoRALayout) -> int:
    """Used blocks that lie wholly inside x; the one after them, if used, is the padded last block."""
    return min(layout.in_features // layout.r_hat, layout.n_used_blocks)


def _rotate(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """R_i v_i (or R_iᵀ v_i) for blocks v (..., n, r̂), rotate-half pairs (t, t + r̂/2) (Eq. 10–11).

    Three fused passes, no rotate-half copy. On a GPU the float32 tables promote a bfloat16 v in-register. A
    CPU has no vectorised loop for operands of two dtypes (bfloat16 v, float32 tables: 7.5x slower than one
    dtype, which made rotation miss its bfloat16 targets where the GEMMs are fast), so there both are converted
    to the promoted dtype once (float64 v: the same arithmetic as before) and the result rounded to v's dtype once.
    """
    if v.device.type == "cpu" and v.dtype != cos.dtype:
        dtype = torch.promote_types(v.dtype, cos.dtype)
        rotated = _rotate(v.to(dtype), cos.to(dtype), sin.to(dtype), transpose)
        return rotated.to(v.dtype) if out is None else out.copy_(rotated)
    h = v.shape[-1] // 2
    sin_half, sign = sin[:, :h], 1.0 if transpose else -1.0
    out = torch.mul(v, cos, out=torch.empty_like(v) if out is None else out)
    out[..., :h].addcmul_(v[..., h:], sin_half, value=sign)
    out[..., h:].addcmul_(v[..., :h], sin_half, value=-sign)
    return out


def _input_blocks(x2: torch.Tensor, layout: MoRALayout, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None) -> torch.Tensor:
    """a_i = R_i x̃_i over the used blocks (Eq. 10; x̃_i itself without tables), (T, n, r̂).

    Blocks that lie wholly inside x are a view of it (contiguous when they span x's rows); a padded last
    block makes x̃ one copy (one cat), and rotation is one pass over all blocks: few kernels, which is
    what a GPU step at these sizes pays for.
    """
    r, n = layout.r_hat, layout.n_used_blocks
    blocks = padded_slice(x2, 0, n * r, layout.padding).unflatten(-1, (n, r))        # (T, n, r̂)
    return blocks if cos is None else _rotate(blocks, cos[:n], sin[:n])


def _blockwise_forward(out: torch.Tensor, x: torch.Tensor, P: torch.Tensor, layout: MoRALayout) -> torch.Tensor:
    """out += concat_i(P^i x̃_i) over the used blocks, truncated or tiled to d; P is (n_used, r̂, r̂).

    Full blocks are read as a strided view of x (no copy) by one batched GEMM writing a
    contiguous (n, T, r̂); only a padded last block is copied (r̂ wide).
    """
    r, k, n = layout.r_hat, layout.in_features, layout.n_used_blocks
    x2 = x.reshape(-1, k)                                                           # (T, k)
    n_full = _full_blocks(layout)
    z = x2.new_empty(n, x2.shape[0], r)                                             # (n, T, r̂)
    if n_full:
        blocks = x2[:, :n_full * r].unflatten(-1, (n_full, r)).transpose(0, 1)     # (n_full, T, r̂) view
        torch.bmm(blocks, P[:n_full].transpose(1, 2), out=z[:n_full])
    if n > n_full:
        torch.mm(padded_slice(x2, n_full * r, r, layout.padding), P[n_full].T, out=z[n_full])
    z = z.transpose(0, 1).reshape(*x.shape[:-1], n, r)                              # (..., n, r̂), a view
    return _add_periodic(out, z.to(out.dtype), 0, layout.n_blocks * r)


def _blocks_to_columns(g: torch.Tensor, layout: MoRALayout, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None) -> torch.Tensor:
    """(T, n, r̂) gradients of the used (padded) blocks -> ∂x (T, k), rotated back by R_iᵀ when
    given the tables; the padded part folded onto the inputs it copies, zero past the used blocks."""
    r, k, n = layout.r_hat, layout.in_features, layout.n_used_blocks
    if cos is not None:
        g = _rotate(g, cos[:n], sin[:n], transpose=True)
    if not g.is_contiguous():  # the stack's blocks (a transposed view): copied once, straight into ∂x
        return _strided_blocks_to_columns(g, layout)
    flat = g.view(g.shape[0], n * r)                                                 # (T, n·r̂)
    if n * r < k:  # inputs past the used blocks never reach the output
        return torch.nn.functional.pad(flat, (0, k - n * r))
    if n * r == k:
        return flat if flat.is_contiguous() else flat.contiguous()
    grad_x = flat[:, :k].contiguous()
    if layout.padding == "wrap":  # padded position p reads x_{p mod k}
        add_wrapped(grad_x, flat[:, k:])
    return grad_x


def _strided_blocks_to_columns(g: torch.Tensor, layout: MoRALayout) -> torch.Tensor:
    """_blocks_to_columns of unrotated blocks given as a strided view: full blocks and the padded tail
    copied into ∂x directly (a contiguous copy first would move T·k entries twice)."""
    r, k, n = layout.r_hat, layout.in_features, layout.n_used_blocks
    n_full = _full_blocks(layout)
    grad_x = g.new_empty(g.shape[0], k)
    grad_x[:, :n_full * r].unflatten(-1, (n_full, r)).copy_(g[:, :n_full])
    if n == n_full:
        grad_x[:, n_full * r:].zero_()  # inputs past the used blocks never reach the output
        return grad_x
    inside = k - n_full * r
    grad_x[:, n_full * r:] = g[:, n_full, :inside]
    if layout.padding == "wrap":  # padded position p reads x_{p mod k}
        add_wrapped(grad_x, g[:, n_full, inside:])
    return grad_x


def _blockwise_grad_P(grad_z: torch.Tensor, x2: torch.Tensor, layout: MoRALayout) -> torch.Tensor:
    """∂P^i = ∂z_iᵀ x̃_i summed over tokens, (n, r̂, r̂), reading x's blocks in place."""
    r, n = layout.r_hat, layout.n_used_blocks
    n_full = _full_blocks(layout)
    grad_P = grad_z.new_empty(n, r, r)
    if n_full:
        blocks = x2[:, :n_full * r].unflatten(-1, (n_full, r)).transpose(0, 1)     # (n_full, T, r̂)
        torch.bmm(grad_z[:n_full].transpose(1, 2), blocks, out=grad_P[:n_full])
    if n > n_full:
        torch.mm(grad_z[n_full].T, padded_slice(x2, n_full * r, r, layout.padding), out=grad_P[n_full])
    return grad_P


def mora_delta_weight(M: torch.Tensor, layout: MoRALayout, cos: torch.Tensor | None = None,
                      sin: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = f_decomp(f_comp(M)) ∈ R^{d×k} (Eq. 3), vectorised, in M's dtype."""
    d, k, r = layout.out_features, layout.in_features, layout.r_hat
    if layout.operator == "truncate":  # Eq. 5: M in the top-left corner
        delta_padded = M.new_zeros(d, r)
        rows = min(d, r)
        delta_padded[:rows] = M[:rows]
        return fold_padded_columns(delta_padded, k, layout.padding)
    if layout.operator == "share":  # Eq. 7: ΔW_ij = M[g'(i), g(j)]
        if layout.decompress_groups == "cyclic":                          # row i is M's row i mod r̂
            rows = M.repeat(math.ceil(d / r), 1)[:d]                      # (d, r̂)
        else:
            rows = M[block_groups(d, r).to(M.device)]
        if layout.compress_groups == "block":
            return rows[:, block_groups(k, r).to(M.device)]
        return tile_columns(rows, k, layout.padding)
    return _blockwise_delta_weight(M, layout, cos, sin)


def tile_columns(rows: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """(d, r̂) -> (d, k): column j is rows[:, j mod r̂], plus the wrapped padded columns folded in.

    Equals fold_padded_columns(rows[:, arange(⌈k/r̂⌉·r̂) % r̂]) with one broadcast copy instead of
    a padded gather and a second copy.
    """
    d, r = rows.shape
    q, rem = divmod(k, r)
    delta = rows.new_empty(d, k)
    if q:
        delta[:, :q * r].view(d, q, r).copy_(rows.unsqueeze(1))
    if rem:
        delta[:, q * r:].copy_(rows[:, :rem])
        if padding == "wrap":  # padded positions q·r̂+rem … read feature p mod k, group p mod r̂
            add_wrapped(delta, rows[:, rem:])
    return delta


def _blockwise_delta_weight(M: torch.Tensor, layout: MoRALayout, cos: torch.Tensor | None,
                            sin: torch.Tensor | None) -> torch.Tensor:
    """Block-diagonal ΔW of Eq. 8/9, written straight into the (d, k) result.

    Row i holds concatenated position i mod n·r̂ (truncated or tiled to d): block b's P^b sits at
    rows b·r̂… and columns b·r̂… of the first period, a padded last block's wrapped columns are
    folded onto the inputs they copy, and later periods are copies of the first. One zero fill of
    (d, k) plus n·r̂² writes (P^b computed in place on the diagonal), no (n r̂)² intermediate.
    """
    d, k, r = layout.out_features, layout.in_features, layout.r_hat
    n = layout.n_used_blocks
    period = min(d, layout.n_blocks * r)
    delta = M.new_zeros(d, k)
    n_head = min(_full_blocks(layout), period // r)  # blocks wholly inside the first period and x
    if n_head:
        head = delta[:n_head * r, :n_head * r].unflatten(0, (n_head, r)).unflatten(-1, (n_head, r))
        diagonal = head.diagonal(dim1=0, dim2=2).permute(2, 0, 1)                 # (n_head, r̂, r̂) view
        if layout.operator == "decouple":
            diagonal.copy_(M.expand_as(diagonal))
        else:
            rotated_blocks(M, cos[:n_head], sin[:n_head], out=diagonal)
    if n > n_head:  # the last used block, cut by d's rows or by k's columns (padded)
        P = M if layout.operator == "decouple" else rotated_blocks(M, cos[n_head:n], sin[n_head:n],
                                                                    out=M.new_empty(1, r, r))[0]
        rows = slice(n_head * r, min(period, n_head * r + r))
        inside = min(r, k - n_head * r)
        part = P[:rows.stop - rows.start]
        delta[rows, n_head * r:n_head * r + inside] = part[:, :inside]
        if inside < r and layout.padding == "wrap":
            add_wrapped(delta[rows], part[:, inside:])
    if d > period:  # tiled: row i repeats row i mod period
        n_tiles, rem = divmod(d, period)
        delta[period:n_tiles * period].unflatten(0, (n_tiles - 1, period)).copy_(delta[:period])
        delta[n_tiles * period:] = delta[:rem]
    return delta
