"""Put MoRA or one of the paper's baselines into any PyTorch / transformers model.

What each method is (its layer kind, initialisation, optimizer, restarts) is looked up in the
registry, :mod:`mora.methods`; this module injects, merges, saves and loads by it. ReLoRA/ReMoRA's
merge-and-reinit, group switch and optimizer reset live in :mod:`mora.restarts`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from .budget import ROUNDINGS
from .layer import MoRAAdapter, MoRALinear, register_base_weight_flag
from .methods import METHOD_LAYERS, METHODS, PEFT_ADAPTER
from .operators import GROUP_KINDS, OPERATORS, PADDINGS
from .validation import check_choice, check_float, check_int

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class AdapterConfig:
    """What to inject where. ``rank`` is a LoRA parameter budget (Section 4).

    ``method`` is a name in the registry :data:`mora.methods.METHODS`. ``alpha`` is LoRA's α
    (scaling α/r; Table 5 uses 16 at r=8 and 128 at r=256), ``None`` = 2r. MoRA has no α.
    ``trainable_modules`` are name suffixes of modules left trainable besides the adapters (e.g.
    ``embed_tokens``, ``norm`` — which matches every *norm module — ``lm_head``).
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
        check_choice("method", self.method, METHODS)
        for name, allowed in (("operator", OPERATORS), ("compress_groups", GROUP_KINDS),
                              ("decompress_groups", GROUP_KINDS), ("padding", PADDINGS), ("rounding", ROUNDINGS)):
            check_choice(name, getattr(self, name), allowed)
        check_int("rank", self.rank)
        check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_float("alpha", self.alpha, 0.0, low_open=True, allow_none=True)  # α/r scales ΔW
        check_float("loraplus_ratio", self.loraplus_ratio, 1.0)  # λ = η_B/η_A
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


def _extra_trainable(model: nn.Module, patterns: tuple[str, ...]) -> list[nn.Module]:
    """Modules whose last name component ends with one of ``patterns``; raises for a pattern that
    matches none."""
    chosen = []
    for pattern in patterns:
        found = [m for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1].endswith(pattern)]
        if not found:
            raise ValueError(f"trainable_modules pattern {pattern!r} matches no module of the model")
        chosen += found
    return chosen


def check_targets(model: nn.Module, config: AdapterConfig) -> None:
    """Raise what :func:`inject_adapters` would for ``target_modules`` or ``trainable_modules`` that
    match nothing, changing nothing: ``model`` may be a skeleton on the meta device, so that a typo
    fails before the weights are loaded."""
    if config.layer_kind is not None:
        find_target_linears(model, config.target_modules)
        _extra_trainable(model, config.trainable_modules)


# ----------------------------------------------------------------------------- injection

def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Inject the adapters of ``config.method`` in place, freeze the rest; returns ``model``."""
    method = METHODS[config.method]
    if method.layer_kind is None:
        model.requires_grad_(True)
        return model
    targets = find_target_linears(model, config.target_modules)
    model.requires_grad_(False)
    _INJECT[method.layer_kind](model, targets, config)
    if method.init_layer is not None:
        for layer in adapter_layers(model).values():
            method.init_layer(layer)
    for module in _extra_trainable(model, config.trainable_modules):
        module.requires_grad_(True)
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
                             target_modules=targets, **METHODS[config.method].lora_options)
    inject_adapter_in_model(peft_config, model)
    if hasattr(model, "peft_config"):  # keep the model a plain transformers model
        del model.peft_config
    for layer in lora_layers(model).values():  # MoRALinear registers its own
        register_base_weight_flag(layer, layer.get_base_layer().weight.device)


_INJECT = {"lora": _inject_lora, "mora": _inject_mora}


# ----------------------------------------------------------------------------- layer access

def mora_layers(model: nn.Module) -> dict[str, MoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every injected adapter layer (MoRA or peft LoRA-family), by module name."""
    return {**mora_layers(model), **lora_layers(model)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' own parameters (M; A, B, DoRA's magnitude), frozen ones too; not base weights."""
    return [p for layer in adapter_layers(model).values() for p in _own_parameters(layer)]


def adapter_summary(model: nn.Module) -> list[dict]:
    """One row per adapted module: shape, r or r̂, trainable parameters, LoRA's at that rank."""
    rows = []
    for name, layer in adapter_layers(model).items():
        k, d = layer.in_features, layer.out_features
        if isinstance(layer, MoRALinear):
            row = dict(kind="mora", r_hat=layer.mora.r_hat, params=layer.mora.M.numel())
        else:
            r = layer.r[PEFT_ADAPTER]
            row = dict(kind="lora", r=r, params=sum(p.numel() for p in _own_parameters(layer)))
        rows.append(dict(name=name, in_features=k, out_features=d, **row))
    return rows


def _own_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


@torch.no_grad()
def effective_weight(layer: nn.Module) -> torch.Tensor:
    """float32 copy of the (d, k) weight ``layer`` applies right now, pending adapters included.

    MoRA: W0 + ΔW (Eq. 3), or W0 once ΔW is merged. peft LoRA-family layers: W0 plus every active,
    unmerged adapter's (α/r)·BA, and for DoRA the row-wise rescaling W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row
    its forward applies (Liu et al. 2024). A plain ``nn.Linear``: its weight. The spectra of Fig. 5
    compare this before and after training, whatever has been merged so far.
    """
    if isinstance(layer, MoRALinear):
        weight = layer.base_layer.weight.float()
        return weight.clone() if layer.merged else weight + layer.mora.delta_weight().float()
    if isinstance(layer, LoraLayer):
        return _lora_effective_weight(layer)
    if isinstance(layer, nn.Linear):
        return layer.weight.float().clone()
    raise TypeError(f"effective_weight takes an adapter layer or an nn.Linear, got {type(layer).__name__}")


def _lora_effective_weight(layer: LoraLayer) -> torch.Tensor:
    weight = layer.get_base_layer().weight.float().clone()  # (d, k)
    if layer.disable_adapters:
        return weight
    for name in layer.active_adapters:
        if name not in layer.lora_A or name in layer.merged_adapters:
            continue
        weight = weight + layer.get_delta_weight(name).float()
        if layer.use_dora.get(name, False):
            magnitude = layer.lora_magnitude_vector[name].weight.float()  # (d,)
            weight = weight * (magnitude / weight.norm(dim=1)).unsqueeze(1)
    return weight


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
    """The method's optimizer over the trainable parameters (LoRA+: B at λ·lr, via peft)."""
    return METHODS[config.method].build_optimizer(model, config, optimizer_cls, lr, weight_decay, **kwargs)


# ----------------------------------------------------------------------------- save / load

def adapter_state_dict(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The tensors that, with the base model, reproduce the trained one.

    The adapter layers' own state (parameters, frozen ones too such as AsyLoRA's A, and buffers:
    MoRA's sharing groups, the ``base_weight_modified`` flag), every other trainable parameter,
    and the base weights of layers whose flag says merge-and-reinit wrote updates into them.
    FFT: the whole state dict. Each tensor once: a tied alias (``lm_head.weight`` sharing the
    embedding, as stories260K's does) is left out, since safetensors refuses shared tensors and
    loading the embedding restores it.
    """
    params = dict(model.named_parameters())
    unique = params | dict(model.named_buffers())  # aliases named once
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items() if n in unique}
    if config.layer_kind is None:
        return state
    layers = adapter_layers(model)
    if any(getattr(l, "merged", False) for l in layers.values()):
        raise RuntimeError("unmerge adapters before saving them (merged ΔW lives in the base weights)")
    modified = {n for n, l in layers.items() if l.base_weight_modified}
    keep = {}
    for name, tensor in state.items():
        owner = next((n for n in layers if name.startswith(n + ".")), None)
        in_adapter = owner is not None and ".base_layer." not in name[len(owner):]
        trainable = name in params and params[name].requires_grad
        if in_adapter or trainable or owner in modified:
            keep[name] = tensor
    return keep


def save_adapter(model: nn.Module, directory: str | Path, config: AdapterConfig) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps({"config": asdict(config)}, indent=2))
    save_file(adapter_state_dict(model, config), str(directory / ADAPTER_WEIGHTS))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterConfig:
    """Inject the adapters saved in ``directory`` into a fresh base ``model`` and load them."""
    directory = Path(directory)
    config = AdapterConfig(**json.loads((directory / ADAPTER_CONFIG).read_text())["config"])
    inject_adapters(model, config)
    load_adapter_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    return config


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors; every key must exist in the model with the same shape.

    Loads through ``model.load_state_dict``, so layers restore their own state from it (MoRA's
    sharing groups rebuild its layout). A tied alias (``lm_head.weight`` of a model whose head
    shares the embedding) is accepted too: FFT checkpoints written before
    :func:`adapter_state_dict` left aliases out still hold it.
    """
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"adapter tensors not in the model (wrong base model or config?): {unknown[:5]}")
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise ValueError(f"{key}: saved shape {tuple(tensor.shape)} != model shape {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=False)  # the keys not saved keep the base model's values
