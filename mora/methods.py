"""The method registry: the one place a method's name is read (Section 5.2.2's methods).

Each :class:`Method` says what a method is: the kind of layer it injects, the peft options of
its LoRA layers, how the layers start, how its optimizer is built and whether it restarts.
Adding a method is one :func:`register_method` call (plus ``conf/method/<name>.yaml``).

=========  ====================================================================================
fft        no adapter; every parameter trains.
lora       peft ``LoraConfig`` layers (scaling α/r), injected in place.
dora       peft ``LoraConfig(use_dora=True)``.
loraplus   peft LoRA layers + ``peft.optimizers.create_loraplus_optimizer`` (η_B = λ·η_A).
asylora    peft LoRA layers; A re-drawn as r orthonormal rows of a random matrix and frozen, B zero
           and trained (Zhu et al. 2024). The MoRA authors' released code left A trainable.
relora     peft LoRA layers merged and re-initialised during training (:mod:`mora.restarts`).
mora       :class:`mora.layer.MoRALinear` (peft has no MoRA and cannot register an outside tuner).
remora     MoRA merged during training, with a switch of the sharing groups (Appendix B).
=========  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .validation import check_choice

if TYPE_CHECKING:
    from .adapters import AdapterConfig

LAYER_KINDS = (None, "lora", "mora")  # None: no adapter (full fine-tuning)
PEFT_ADAPTER = "default"  # the adapter name peft gives the layers it injects


def trainable_optimizer(model: nn.Module, config: AdapterConfig, optimizer_cls: type[torch.optim.Optimizer],
                        lr: float, weight_decay: float, **kwargs) -> torch.optim.Optimizer:
    """One parameter group: every trainable parameter at ``lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay, **kwargs)


@dataclass(frozen=True)
class Method:
    """What one method is; :mod:`mora.adapters` injects, initialises and optimises by it.

    Args:
        name: the name configs use (``method=<name>``).
        layer_kind: ``None`` (no adapter, every parameter trains), ``"lora"`` (peft LoRA-family
            layers) or ``"mora"`` (:class:`mora.layer.MoRALinear`).
        lora_options: extra ``peft.LoraConfig`` arguments of a ``lora`` method (DoRA: use_dora).
        init_layer: run on every injected layer after injection (AsyLoRA's frozen orthonormal A).
        build_optimizer: ``(model, config, optimizer_cls, lr, weight_decay, **kwargs)`` →
            optimizer; LoRA+ gives B its own rate.
        restarts: merges its adapters into the base weights and re-initialises them during
            training (ReLoRA, ReMoRA); only such a method accepts restart settings.
    """

    name: str
    layer_kind: str | None
    lora_options: Mapping[str, object] = field(default_factory=dict)
    init_layer: Callable[[nn.Module], None] | None = None
    build_optimizer: Callable[..., torch.optim.Optimizer] = trainable_optimizer
    restarts: bool = False

    def __post_init__(self) -> None:
        check_choice("layer_kind", self.layer_kind, LAYER_KINDS)
        if self.lora_options and self.layer_kind != "lora":
            raise ValueError(f"method {self.name!r}: lora_options need layer_kind='lora', got {self.layer_kind!r}")
        if self.layer_kind is None and (self.init_layer is not None or self.restarts):
            raise ValueError(f"method {self.name!r} injects no layer: it has none to initialise or restart")


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name, which must be new; returns it."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; the error lists the registered ones."""
    check_choice("method", name, METHODS)
    return METHODS[name]


class LayerKinds(Mapping):
    """A read-only view of the registry: method name → its layer kind (None, "lora", "mora")."""

    def __getitem__(self, name: str) -> str | None:
        return METHODS[name].layer_kind

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)


METHOD_LAYERS = LayerKinds()


# ----------------------------------------------------------------------------- the paper's methods

@torch.no_grad()
def asylora_init(layer: LoraLayer) -> None:
    """A ← r orthonormal rows (right-singular vectors of a Gaussian r×k matrix), frozen; B = 0."""
    A = layer.lora_A[PEFT_ADAPTER].weight  # (r, k)
    if A.shape[0] > A.shape[1]:
        raise ValueError(f"asylora needs rank ≤ in_features, got rank={A.shape[0]} > {A.shape[1]}")
    gaussian = torch.randn(A.shape, device=A.device, dtype=torch.float32)
    A.copy_(torch.linalg.svd(gaussian, full_matrices=False).Vh.to(A.dtype))
    A.requires_grad_(False)
    layer.lora_B[PEFT_ADAPTER].weight.zero_()


def loraplus_optimizer(model: nn.Module, config: AdapterConfig, optimizer_cls: type[torch.optim.Optimizer],
                       lr: float, weight_decay: float, **kwargs) -> torch.optim.Optimizer:
    """peft's LoRA+ groups: B at λ·lr with λ = ``config.loraplus_ratio`` (Hayou et al. 2024)."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=config.loraplus_ratio,
                                     weight_decay=weight_decay, **kwargs)


register_method(Method("fft", layer_kind=None))
register_method(Method("lora", layer_kind="lora"))
register_method(Method("dora", layer_kind="lora", lora_options={"use_dora": True}))
register_method(Method("loraplus", layer_kind="lora", build_optimizer=loraplus_optimizer))
register_method(Method("asylora", layer_kind="lora", init_layer=asylora_init))
register_method(Method("relora", layer_kind="lora", restarts=True))
register_method(Method("mora", layer_kind="mora"))
register_method(Method("remora", layer_kind="mora", restarts=True))
