"""MoRA modules: the adapter (x ↦ Δx, Eq. 2) and a Linear wrapper that can merge it (Eq. 3).

``MoRAAdapter`` holds the only trainable tensor, the zero-initialised square M ∈ R^{r̂×r̂}
(Section 5.1: "we can directly initialize M with zeros"), and is pure math: no I/O, no model
names. ``MoRALinear`` wraps a frozen ``nn.Linear`` and adds the adapter's output in place into
the base output, so decompression never materialises a tiled copy.

Both carry their own state in their ``state_dict``: the adapter its sharing groups (ReMoRA
switches them, Appendix B), the linear whether its base weight holds merged updates. Saving and
loading a state dict restores them; nothing outside the layer has to remember them.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from .budget import mora_r_hat
from .operators import GROUP_KINDS, MoRALayout, add_mora_update, mora_delta_weight, rotation_tables


def register_base_weight_flag(layer: nn.Module, device: torch.device) -> None:
    """Give an adapter layer a persistent bool buffer ``base_weight_modified``, False.

    True once merge-and-reinit wrote updates into the base weight (ReLoRA, ReMoRA): the base
    weight is then trained state that must be saved. A buffer, so the flag saves and loads with
    the layer's state dict.
    """
    layer.register_buffer("base_weight_modified", torch.tensor(False, device=device))


class MoRAAdapter(nn.Module):
    """Δx = f_decomp(M f_comp(dropout(x))) for a d×k weight (Eq. 2), with ΔW = delta_weight().

    Args:
        in_features, out_features: k and d of the adapted weight W0 ∈ R^{d×k}.
        r_hat: side of M. Use :meth:`from_rank` to derive it from a LoRA rank budget.
        operator: ``truncate`` (Eq. 4) | ``share`` (Eq. 6) | ``decouple`` (Eq. 8) | ``rotate`` (Eq. 9).
        compress_groups, decompress_groups: ``cyclic`` | ``block`` group layout of ``share``
            (Appendix B), chosen independently per side.
        padding: ``wrap`` (official code: x̃ = [x, x[:pad]]) | ``zero``.
        dropout: applied to x before compression, as in the official code.
    """

    def __init__(self, in_features: int, out_features: int, r_hat: int, operator: str = "share",
                 compress_groups: str = "cyclic", decompress_groups: str = "cyclic",
                 padding: str = "wrap", dropout: float = 0.0):
        super().__init__()
        self.layout = MoRALayout(in_features, out_features, r_hat, operator, compress_groups,
                                 decompress_groups, padding)
        if r_hat * r_hat > in_features * out_features:
            raise ValueError(f"r_hat={r_hat} gives M more entries ({r_hat ** 2}) than the "
                             f"{out_features}×{in_features} weight it adapts; lower the rank")
        if r_hat > min(in_features, out_features) and operator in ("share", "truncate"):
            warnings.warn(f"r_hat={r_hat} exceeds min(d={out_features}, k={in_features}): "
                          "some rows or columns of M can never affect ΔW", stacklevel=2)
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat))
        # The sharing groups as indices into GROUP_KINDS, (compress, decompress): a persistent
        # buffer that saves and loads with M. Forward reads ``self.layout``, a Python object
        # rebuilt from it on load, so the forward never waits for the device.
        self.register_buffer("groups", torch.tensor(self._group_indices(self.layout)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Rotation tables are non-persistent buffers (a function of r̂ alone, never saved) that
        # follow the module's device; _apply keeps them float32 whatever dtype the module takes.
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self._build_rotation_tables(torch.device("cpu"))

    def _build_rotation_tables(self, device: torch.device) -> None:
        n_blocks = self.layout.n_used_blocks if self.layout.operator == "rotate" else 0
        cos, sin = rotation_tables(self.layout.r_hat, n_blocks)
        self.cos, self.sin = cos.to(device), sin.to(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.M.device.type != "meta":
            self._build_rotation_tables(self.M.device)
        return self

    @classmethod
    def from_rank(cls, in_features: int, out_features: int, rank: int, operator: str = "share",
                  rounding: str = "nearest", **kwargs) -> "MoRAAdapter":
        """Adapter with LoRA's parameter count at ``rank`` (Section 4), r̂ even for rotation."""
        r_hat = mora_r_hat(in_features, out_features, rank, rounding, even=operator == "rotate")
        return cls(in_features, out_features, r_hat, operator, **kwargs)

    @property
    def r_hat(self) -> int:
        return self.layout.r_hat

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out (..., d) += Δx for x (..., k), in place; returns out."""
        return add_mora_update(out, self.dropout(x), self.M, self.layout, self.cos, self.sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.layout.out_features, dtype=self.M.dtype)
        return self.add_to(out, x)

    def delta_weight(self) -> torch.Tensor:
        """ΔW ∈ R^{d×k} such that forward(x) == x @ ΔWᵀ (Eq. 3), built without loops."""
        return mora_delta_weight(self.M, self.layout, self.cos, self.sin)

    @staticmethod
    def _group_indices(layout: MoRALayout) -> list[int]:
        return [GROUP_KINDS.index(layout.compress_groups), GROUP_KINDS.index(layout.decompress_groups)]

    def set_groups(self, compress_groups: str, decompress_groups: str) -> None:
        """Change the sharing layout (ReMoRA switches it after each merge, Appendix B)."""
        self.layout = replace(self.layout, compress_groups=compress_groups, decompress_groups=decompress_groups)
        self.groups.copy_(torch.tensor(self._group_indices(self.layout)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Take the saved groups' layout (ReMoRA's after its last switch), then load the tensors."""
        saved = state_dict.get(prefix + "groups")
        if saved is not None and saved.shape == self.groups.shape:  # a wrong shape: the base class reports it
            indices = saved.tolist()
            if not all(0 <= i < len(GROUP_KINDS) for i in indices):
                raise ValueError(f"{prefix}groups: saved group indices {indices} are not indices into {GROUP_KINDS}")
            self.set_groups(*(GROUP_KINDS[i] for i in indices))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.M)

    def extra_repr(self) -> str:
        lay = self.layout
        groups = f", groups={lay.compress_groups}/{lay.decompress_groups}" if lay.operator == "share" else ""
        return (f"in_features={lay.in_features}, out_features={lay.out_features}, r_hat={lay.r_hat}, "
                f"operator={lay.operator}{groups}, padding={lay.padding}")


class MoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a MoRA adapter: h = W0 x + Δx, mergeable into W0 (Eq. 3)."""

    def __init__(self, base_layer: nn.Linear, adapter: MoRAAdapter):
        super().__init__()
        if (adapter.layout.in_features, adapter.layout.out_features) != (base_layer.in_features,
                                                                          base_layer.out_features):
            raise ValueError("adapter shape does not match base_layer: "
                             f"{adapter.layout.out_features}×{adapter.layout.in_features} vs "
                             f"{base_layer.out_features}×{base_layer.in_features}")
        self.base_layer = base_layer
        self.mora = adapter
        self.merged = False
        register_base_weight_flag(self, base_layer.weight.device)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else self.mora.add_to(out, x)

    @torch.no_grad()
    def _add_to_base(self, sign: float) -> None:
        delta = self.mora.delta_weight()
        if not torch.isfinite(delta).all():
            raise FloatingPointError("MoRA ΔW holds NaN/inf; refusing to write it into the base weight")
        weight = self.base_layer.weight
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=sign)

    def merge(self) -> None:
        """W0 ← W0 + ΔW; the forward then skips the adapter."""
        if self.merged:
            raise RuntimeError("MoRALinear.merge: already merged")
        self._add_to_base(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """W0 ← W0 − ΔW, undoing :meth:`merge` (exact up to rounding of W0's dtype)."""
        if not self.merged:
            raise RuntimeError("MoRALinear.unmerge: not merged")
        self._add_to_base(-1.0)
        self.merged = False

    def merge_and_reinit(self, groups: tuple[str, str] | None = None) -> None:
        """ReMoRA step (Section 5.3, Appendix B): merge ΔW, zero M, optionally set new groups.

        ``groups=(compress_groups, decompress_groups)``; with the same groups the rank of the
        accumulated ΔW cannot grow, which is why ReMoRA switches them.
        """
        self.merge()
        self.base_weight_modified.fill_(True)
        self.mora.reset_parameters()
        if groups is not None:
            self.mora.set_groups(*groups)
        self.merged = False
