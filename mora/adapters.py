"""Put MoRA or one of the paper's baselines into any PyTorch / transformers model.

Who implements what (Section 5.2.2's methods, all at the same rank budget):

=========  ====================================================================================
fft        no adapter; every parameter trains.
lora       peft ``LoraConfig`` layers (scaling α/r), injected in place.
dora       peft ``LoraConfig(use_dora=True)``.
loraplus   peft LoRA layers + ``peft.optimizers.create_loraplus_optimizer`` (η_B = λ·η_A).
asylora    peft LoRA layers; A re-drawn as r orthonormal rows of a random matrix and frozen, B zero
           and trained (Zhu et al. 2024). The MoRA authors' released code left A trainable.
relora     peft LoRA layers + :func:`merge_and_reinit` here (W += sBA, A Kaiming, B zero).
mora       :class:`mora.layer.MoRALinear` (peft has no MoRA and cannot register an outside tuner).
remora     MoRA + :func:`merge_and_reinit` with a switch of the sharing groups (Appendix B).
=========  ====================================================================================

The schedule of merges and optimizer resets (ReLoRA/ReMoRA) belongs to the training loop; this
module provides the layer-level operation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from .budget import ROUNDINGS, lora_parameter_count
from .layer import MoRAAdapter, MoRALinear
from .operators import GROUP_KINDS, OPERATORS, PADDINGS

# method -> the kind of layer it injects (None: full fine-tuning)
METHOD_LAYERS = {"fft": None, "lora": "lora", "dora": "lora", "loraplus": "lora",
                 "asylora": "lora", "relora": "lora", "mora": "mora", "remora": "mora"}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_ADAPTER = "default"


@dataclass
class AdapterConfig:
    """What to inject where. ``rank`` is a LoRA parameter budget (Section 4).

    ``alpha`` is LoRA's α (scaling α/r; Table 5 uses 16 at r=8 and 128 at r=256), ``None`` = 2r.
    MoRA has no α. ``trainable_modules`` are name suffixes of modules left trainable besides the
    adapters (e.g. ``embed_tokens``, ``norm`` — which matches every *norm module — ``lm_head``).
    """

    method: str = "mora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    trainable_modules: tuple[str, ...] = ()
    operator: str = "share"
    compress_groups: str = "cyclic"
    decompress_groups: str = "cyclic"
    padding: str = "wrap"
    rounding: str = "nearest"
    loraplus_ratio: float = 4.0
    extra: dict = field(default_factory=dict)  # free-form notes carried into saved configs

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.trainable_modules = tuple(self.trainable_modules)
        choices = {"method": (self.method, tuple(METHOD_LAYERS)), "operator": (self.operator, OPERATORS),
                   "compress_groups": (self.compress_groups, GROUP_KINDS),
                   "decompress_groups": (self.decompress_groups, GROUP_KINDS),
                   "padding": (self.padding, PADDINGS), "rounding": (self.rounding, ROUNDINGS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {name}={value!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got rank={self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout}")
        if self.loraplus_ratio < 1.0:
            raise ValueError(f"loraplus_ratio (λ = η_B/η_A) must be ≥ 1, got {self.loraplus_ratio}")
        if self.layer_kind is not None and not self.target_modules:
            raise ValueError(f"target_modules must name at least one module for method={self.method!r}")

    @property
    def layer_kind(self) -> str | None:
        return METHOD_LAYERS[self.method]

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)


# ----------------------------------------------------------------------------- matching

def _suffix_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def find_target_linears(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """Names of the ``nn.Linear`` modules matched by ``target_modules`` (peft's suffix rule).

    Raises if any pattern matches no Linear, listing the Linear names that exist.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [p for p in target_modules if not any(_suffix_matches(n, p) for n in linears)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"target_modules {unmatched} match no nn.Linear in the model; "
                         f"Linear names available: {leaves}")
    return [n for n in linears if any(_suffix_matches(n, p) for p in target_modules)]


def _set_extra_trainable(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Unfreeze modules whose last name component ends with one of ``patterns``."""
    for pattern in patterns:
        chosen = [m for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1].endswith(pattern)]
        if not chosen:
            raise ValueError(f"trainable_modules pattern {pattern!r} matches no module of the model")
        for module in chosen:
            module.requires_grad_(True)


# ----------------------------------------------------------------------------- injection

def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Inject the adapters of ``config.method`` in place, freeze the rest; returns ``model``."""
    if config.layer_kind is None:
        model.requires_grad_(True)
        return model
    targets = find_target_linears(model, config.target_modules)
    model.requires_grad_(False)
    if config.layer_kind == "mora":
        _inject_mora(model, targets, config)
    else:
        _inject_lora(model, targets, config)
    _set_extra_trainable(model, config.trainable_modules)
    return model


def _inject_mora(model: nn.Module, targets: list[str], config: AdapterConfig) -> None:
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base: nn.Linear = getattr(parent, child)
        adapter = MoRAAdapter.from_rank(
            base.in_features, base.out_features, config.rank, config.operator, config.rounding,
            compress_groups=config.compress_groups, decompress_groups=config.decompress_groups,
            padding=config.padding, dropout=config.dropout)
        adapter.to(device=base.weight.device, dtype=base.weight.dtype)
        setattr(parent, child, MoRALinear(base, adapter))


def _inject_lora(model: nn.Module, targets: list[str], config: AdapterConfig) -> None:
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                             target_modules=targets, use_dora=config.method == "dora")
    inject_adapter_in_model(peft_config, model)
    if hasattr(model, "peft_config"):  # keep the model a plain transformers model
        del model.peft_config
    if config.method == "asylora":
        for layer in lora_layers(model).values():
            _asylora_init(layer)


@torch.no_grad()
def _asylora_init(layer: LoraLayer) -> None:
    """A ← r orthonormal rows (right-singular vectors of a Gaussian r×k matrix), frozen; B = 0."""
    A = layer.lora_A[_PEFT_ADAPTER].weight  # (r, k)
    if A.shape[0] > A.shape[1]:
        raise ValueError(f"asylora needs rank ≤ in_features, got rank={A.shape[0]} > {A.shape[1]}")
    gaussian = torch.randn(A.shape, device=A.device, dtype=torch.float32)
    A.copy_(torch.linalg.svd(gaussian, full_matrices=False).Vh.to(A.dtype))
    A.requires_grad_(False)
    layer.lora_B[_PEFT_ADAPTER].weight.zero_()


# ----------------------------------------------------------------------------- layer access

def mora_layers(model: nn.Module) -> dict[str, MoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every injected adapter layer (MoRA or peft LoRA-family), by module name."""
    return {**mora_layers(model), **lora_layers(model)}


def adapter_summary(model: nn.Module) -> list[dict]:
    """One row per adapted module: shape, r or r̂, trainable parameters, LoRA's at that rank."""
    rows = []
    for name, layer in adapter_layers(model).items():
        k, d = layer.in_features, layer.out_features
        if isinstance(layer, MoRALinear):
            row = dict(kind="mora", r_hat=layer.mora.r_hat, params=layer.mora.M.numel())
        else:
            r = layer.r[_PEFT_ADAPTER]
            row = dict(kind="lora", r=r, params=sum(p.numel() for p in _peft_adapter_params(layer)))
        rows.append(dict(name=name, in_features=k, out_features=d, **row))
    return rows


def _peft_adapter_params(layer: LoraLayer) -> list[nn.Parameter]:
    return [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- merging

def merge_adapters(model: nn.Module) -> None:
    """W0 ← W0 + ΔW in every adapter layer (forward unchanged, adapters bypassed)."""
    for layer in adapter_layers(model).values():
        if isinstance(layer, LoraLayer):
            layer.merge(safe_merge=True)
        else:
            layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def merge_and_reinit(model: nn.Module, groups: tuple[str, str] | None = None) -> None:
    """ReLoRA / ReMoRA restart at layer level (Lialin et al. 2023; Appendix B).

    LoRA layers: W ← W + (α/r)·BA, then A ← Kaiming-uniform(a=√5), B ← 0 (same Parameter objects,
    so the optimizer keeps them). MoRA layers: W ← W + ΔW, M ← 0, and ``groups`` =
    (compress_groups, decompress_groups) sets a new sharing layout (None keeps it).
    """
    for layer in adapter_layers(model).values():
        if isinstance(layer, MoRALinear):
            layer.merge_and_reinit(groups)
        else:
            _lora_merge_and_reinit(layer)
        layer.base_weight_modified = True  # the merged updates now live in W0: save it too


def _lora_merge_and_reinit(layer: LoraLayer) -> None:
    if layer.use_dora.get(_PEFT_ADAPTER, False):
        raise ValueError("merge_and_reinit is defined for LoRA (ReLoRA), not for DoRA layers")
    delta = layer.get_delta_weight(_PEFT_ADAPTER)
    if not torch.isfinite(delta).all():
        raise FloatingPointError("LoRA ΔW holds NaN/inf; refusing to write it into the base weight")
    weight = layer.get_base_layer().weight
    weight.add_(delta.to(weight.dtype))
    nn.init.kaiming_uniform_(layer.lora_A[_PEFT_ADAPTER].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[_PEFT_ADAPTER].weight)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base ``nn.Linear`` back; returns ``model``.

    The result is an ordinary transformers model that ``save_pretrained`` writes.
    """
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, LoraLayer):
            if not layer.merged:
                layer.merge(safe_merge=True)
            base = layer.get_base_layer()
        else:
            if not layer.merged:
                layer.merge()
            base = layer.base_layer
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    return model


# ----------------------------------------------------------------------------- optimizer

def build_optimizer(model: nn.Module, config: AdapterConfig, lr: float, weight_decay: float = 0.0,
                    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
    """The method's optimizer over trainable parameters; LoRA+ gives B the rate λ·lr (peft)."""
    if config.method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer
        return create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=config.loraplus_ratio,
                                         weight_decay=weight_decay, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay, **kwargs)


# ----------------------------------------------------------------------------- save / load

def adapter_state_dict(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The tensors that, with the base model, reproduce the trained one.

    Adapter parameters (frozen ones too, e.g. AsyLoRA's A), every other trainable parameter,
    and the base weight of adapter layers into which merge_and_reinit has written updates.
    FFT: the whole state dict, each tensor once: a tied alias (``lm_head.weight`` sharing the
    embedding, as stories260K's does) is left out, since safetensors refuses shared tensors and
    loading the embedding restores it.
    """
    if config.layer_kind is None:
        unique = dict(model.named_parameters()) | dict(model.named_buffers())  # aliases named once
        return {n: t.detach().contiguous() for n, t in model.state_dict().items() if n in unique}
    layers = adapter_layers(model)
    if any(getattr(l, "merged", False) for l in layers.values()):
        raise RuntimeError("unmerge adapters before saving them (merged ΔW lives in the base weights)")
    keep = {}
    for name, param in model.named_parameters():
        owner = next((n for n in layers if name.startswith(n + ".")), None)
        in_adapter = owner is not None and ".base_layer." not in name[len(owner):]
        merged_base = owner is not None and getattr(layers[owner], "base_weight_modified", False)
        if in_adapter or param.requires_grad or merged_base:
            keep[name] = param.detach().contiguous()
    return keep


def save_adapter(model: nn.Module, directory: str | Path, config: AdapterConfig) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layouts = {n: [l.mora.layout.compress_groups, l.mora.layout.decompress_groups]
               for n, l in mora_layers(model).items()}
    meta = {"config": asdict(config), "mora_groups": layouts}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    save_file(adapter_state_dict(model, config), str(directory / ADAPTER_WEIGHTS))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterConfig:
    """Inject the adapters saved in ``directory`` into a fresh base ``model`` and load them."""
    directory = Path(directory)
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    config = AdapterConfig(**meta["config"])
    inject_adapters(model, config)
    for name, (cg, dg) in meta.get("mora_groups", {}).items():
        model.get_submodule(name).mora.set_groups(cg, dg)  # ReMoRA may have switched them
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    load_adapter_state_dict(model, state)
    for name, layer in adapter_layers(model).items():
        if f"{name}.base_layer.weight" in state:  # saved after merge_and_reinit: keep saving it
            layer.base_weight_modified = True
    return config


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors; every key must exist in the model with the same shape.

    A tied alias (``lm_head.weight`` of a model whose head shares the embedding) is accepted too:
    FFT checkpoints written before :func:`adapter_state_dict` left aliases out still hold it.
    """
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"adapter tensors not in the model (wrong base model or config?): {unknown[:5]}")
    with torch.no_grad():
        for key, tensor in state.items():
            if own[key].shape != tensor.shape:
                raise ValueError(f"{key}: saved shape {tuple(tensor.shape)} != model shape {tuple(own[key].shape)}")
            own[key].copy_(tensor)


def lora_budget(model: nn.Module, config: AdapterConfig) -> int:
    """LoRA's trainable-parameter count at ``config.rank`` over the matched target modules."""
    total = 0
    for name in find_target_linears(model, config.target_modules):
        m = model.get_submodule(name)
        total += lora_parameter_count(m.in_features, m.out_features, config.rank)
    return total

