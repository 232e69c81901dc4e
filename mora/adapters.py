"""Put MoRA or one of the paper's baselines into any PyTorch / transformers model.

What each method is (its layer kind, initialisation, optimizer, restarts) is looked up in the
registry, :mod:`mora.methods`; this module injects, merges, saves and loads by it. ReLoRA/ReMoRA's
merge-and-reinit, group switch and optimizer reset live in :mod:`mora.restarts`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
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
# This library's adapter folders say so: {"format": FORMAT, "format_version": FORMAT_VERSION, "config": ...},
# in adapter_config.json (MoRA, ReMoRA, FFT) or, where that file is peft's own (the LoRA family), in MORA_CONFIG.
FORMAT, FORMAT_VERSION, MORA_CONFIG = "mora-repro", 1, "mora_config.json"
# peft reads adapter_config.json's "peft_type" first and fails with KeyError(<its value>) on a type it does not
# know, before it touches the model: so the value is the message a peft user sees.
NOT_A_PEFT_TYPE = ("not a peft adapter: a mora-repro adapter (MoRA, ReMoRA or full fine-tuning), which peft cannot "
                   "build; load it with mora.load_adapter(model, directory)")


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
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained  # an instance attribute; merge_and_unload removes it
    return model


def _refuse_save_pretrained(*args, **kwargs) -> None:
    """``save_pretrained`` of a model that holds adapter layers.

    Refused rather than merged on the fly. transformers would write ``*.base_layer.weight`` and
    ``*.mora.M`` (or ``*.lora_A.default.weight``), which ``from_pretrained`` drops, leaving every
    adapted projection randomly initialised: a broken model, saved silently. Writing the merged model
    instead would be a guess: peft's ``PeftModel.save_pretrained`` writes the adapter, transformers'
    the full model. A researcher who meant the adapter would get a full-size copy (13 GB for LLaMA-2-7B)
    without noticing, and one who meant the model, merged weights they did not ask for while the model
    in memory stays adapted. Naming both calls makes the choice one line.
    """
    raise RuntimeError("this model holds adapter layers (mora.inject_adapters), which save_pretrained would write "
                       "as weights from_pretrained cannot read. Save the adapter with "
                       "mora.save_adapter(model, directory, config), or a plain model with "
                       "mora.merge_and_unload(model).save_pretrained(directory)")


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


def _lora_config(config: AdapterConfig, targets: list[str], **kwargs) -> LoraConfig:
    """peft's config of the LoRA-family layers of ``config.method`` on the Linears named ``targets``."""
    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=targets, **METHODS[config.method].lora_options, **kwargs)


def _inject_lora(model: nn.Module, targets: list[str], config: AdapterConfig) -> None:
    inject_adapter_in_model(_lora_config(config, targets), model)
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
    model.__dict__.pop("save_pretrained", None)  # no adapter layers left: transformers' own save is right again
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
    loading the embedding restores it. Raises if the model holds no adapter layers of ``config``'s
    kind, or merged ones.
    """
    params = dict(model.named_parameters())
    unique = params | dict(model.named_buffers())  # aliases named once
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items() if n in unique}
    if config.layer_kind is None:
        return state
    layers = _layers_to_save(model, config)
    modified = {n for n, layer in layers.items() if layer.base_weight_modified}
    keep = {}
    for name, tensor in state.items():
        trainable = name in params and params[name].requires_grad
        if _is_adapter_tensor(name, layers) or trainable or _owner(name, layers) in modified:
            keep[name] = tensor
    return keep


def _layers_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The model's adapter layers, refusing a model with none left, of another kind, or merged."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"the model holds no adapter layers of method={config.method!r}, so there is nothing to "
                         "save (merge_and_unload removes them and leaves a plain model: save that with "
                         "model.save_pretrained(directory))")
    kinds = sorted({"mora" if isinstance(layer, MoRALinear) else "lora" for layer in layers.values()})
    if kinds != [config.layer_kind]:
        raise ValueError(f"method={config.method!r} injects {config.layer_kind} layers, the model holds "
                         f"{' and '.join(kinds)} layers: pass the config the model was adapted with")
    if any(getattr(layer, "merged", False) for layer in layers.values()):
        raise RuntimeError("unmerge adapters before saving them (merged ΔW lives in the base weights)")
    return layers


def _owner(name: str, layers: dict[str, nn.Module]) -> str | None:
    """The adapter layer whose state ``name`` is part of, if any."""
    return next((n for n in layers if name.startswith(n + ".")), None)


def _is_adapter_tensor(name: str, layers: dict[str, nn.Module]) -> bool:
    """An adapter layer's own tensor: in a layer, not in its base ``nn.Linear``."""
    owner = _owner(name, layers)
    return owner is not None and ".base_layer." not in name[len(owner):]


# What each format holds, and why, is in README.md ("What interoperates with peft"): the LoRA family is
# saved as peft saves it (peft reads it), MoRA, ReMoRA and FFT in this library's format (peft has no
# MoRA), marked so that each reader names the other when handed the wrong folder.
_PEFT_PREFIX = "base_model.model."  # the prefix of PeftModel's tensor names, which its saved files keep
_FLAG = ".base_weight_modified"


def save_adapter(model: nn.Module, directory: str | Path, config: AdapterConfig) -> Path:
    """Write the adapter into ``directory``: peft's format for the LoRA family, this library's otherwise.

    LoRA family (:data:`mora.methods.METHODS` with ``layer_kind="lora"``): ``adapter_config.json``
    and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them, read by
    ``peft.PeftModel.from_pretrained(base, directory)``; ``mora_config.json`` beside them holds our
    config for :func:`load_adapter`. MoRA, ReMoRA, FFT: ``adapter_config.json`` holds our config and
    the format marker, ``adapter_model.safetensors`` :func:`adapter_state_dict`. Raises, writing
    nothing, if the model holds no adapter layers of ``config``'s kind (after ``merge_and_unload``).
    """
    directory = Path(directory)
    ours = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(config)}
    if config.layer_kind == "lora":
        layers = _layers_to_save(model, config)
        state = _peft_state_dict(model, config, layers)
        peft_config = _lora_config(config, sorted(layers), modules_to_save=list(config.trainable_modules) or None,
                                   ensure_weight_tying=bool(_trained_aliases(model)),
                                   base_model_name_or_path=getattr(model, "name_or_path", None) or None)
        directory.mkdir(parents=True, exist_ok=True)
        peft_config.save_pretrained(str(directory))
        (directory / MORA_CONFIG).write_text(json.dumps(ours, indent=2))
    else:
        state = adapter_state_dict(model, config)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": NOT_A_PEFT_TYPE, **ours}, indent=2))
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    return directory


def _trained_aliases(model: nn.Module) -> dict[str, torch.Tensor]:
    """Second names of trained tensors (stories260K's ``lm_head.weight`` is its embedding), as copies.

    peft keeps the copies it trains tied only if asked to (``LoraConfig.ensure_weight_tying``), and then
    reads each name from the file, as its own save writes each (safetensors refuses shared tensors).
    """
    unique = dict(model.named_parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)
            if n not in unique and p.requires_grad}


@contextmanager
def _as_peft_model(model: nn.Module, config: AdapterConfig) -> Iterator[nn.Module]:
    """``model`` with the ``peft_config`` that peft's state-dict functions read (its low-level API:
    ``inject_adapter_in_model`` sets it, :func:`_inject_lora` removes it again)."""
    model.peft_config = {PEFT_ADAPTER: _lora_config(config, sorted(lora_layers(model)))}
    try:
        yield model
    finally:
        del model.peft_config


def _peft_state_dict(model: nn.Module, config: AdapterConfig, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors ``PeftModel.save_pretrained`` writes, named as it names them (peft's own
    ``get_peft_model_state_dict``, then the ``base_model.model.`` prefix).

    Beside them, under their own names, what has no adapter name: the trained modules (peft's
    ``modules_to_save``, which its loader finds by name) and the base weight of a layer that
    merge-and-reinit wrote into (ReLoRA), which peft's loader loads as it loads every tensor its model
    has. Our ``base_weight_modified`` flag is left out (peft's layers have none): it is true exactly
    where the base weight is in the file.
    """
    with _as_peft_model(model, config):
        state = get_peft_model_state_dict(model, adapter_name=PEFT_ADAPTER, save_embedding_layers=False)
    state |= {n: t for n, t in adapter_state_dict(model, config).items() if not _is_adapter_tensor(n, layers)}
    state |= _trained_aliases(model)
    return {_PEFT_PREFIX + n: t.detach().contiguous() for n, t in state.items() if not n.endswith(_FLAG)}


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterConfig:
    """Inject the adapters saved in ``directory`` by :func:`save_adapter` into a fresh base ``model``
    and load them; a folder another library wrote is refused with the name of its reader."""
    directory = Path(directory)
    config, version = _saved_config(directory)
    inject_adapters(model, config)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    if config.layer_kind == "lora" and version >= 1:
        _load_peft_state_dict(model, config, state)
    else:
        load_adapter_state_dict(model, state)
    return config


def _saved_config(directory: Path) -> tuple[AdapterConfig, int]:
    """The config and format version of a folder :func:`save_adapter` wrote (version 0: before the
    marker, ``{"config": ...}`` alone and our own tensor names for every method)."""
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    if saved.keys() == {"config"}:
        return AdapterConfig(**saved["config"]), 0
    if saved.get("format") != FORMAT and (directory / MORA_CONFIG).exists():  # peft's file, ours beside it
        path = directory / MORA_CONFIG
        saved = json.loads(path.read_text())
        if saved.get("format") != FORMAT:
            raise ValueError(f"{path} has no 'format': '{FORMAT}' marker: not written by mora.save_adapter")
    if saved.get("format") != FORMAT:
        raise ValueError(_foreign_folder(directory, saved))
    version = saved["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(f"{directory} holds {FORMAT} format_version {version}; this version of mora reads up to "
                         f"{FORMAT_VERSION}: update it")
    return AdapterConfig(**saved["config"]), version


def _foreign_folder(directory: Path, saved: dict) -> str:
    if saved.get("use_mora"):
        return (f"{directory} holds an adapter of the official MoRA code (use_mora=true): load it with "
                "mora.load_official_adapter(model, directory)")
    if "peft_type" in saved:
        return (f"{directory} holds a peft adapter (peft_type={saved['peft_type']}) that mora.save_adapter did not "
                f"write (no {MORA_CONFIG} beside it): load it with peft.PeftModel.from_pretrained(model, directory)")
    return f"{directory / ADAPTER_CONFIG} has no 'format': '{FORMAT}' marker: not written by mora.save_adapter"


def _load_peft_state_dict(model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`_peft_state_dict` wrote, through peft's own ``set_peft_model_state_dict``,
    as strictly as :func:`load_adapter_state_dict`; raise the flags of layers whose base weight was saved."""
    layers = lora_layers(model)
    with _as_peft_model(model, config):
        result = set_peft_model_state_dict(model, state, adapter_name=PEFT_ADAPTER)
    missing = [k for k in result.missing_keys if _is_adapter_tensor(k, layers) and not k.endswith(_FLAG)]
    if result.unexpected_keys or missing:
        raise KeyError(f"adapter tensors not in the model (wrong base model or config?): {result.unexpected_keys[:5]}; "
                       f"adapter tensors not in the file: {missing[:5]}")
    for name, layer in layers.items():
        layer.base_weight_modified.fill_(f"{_PEFT_PREFIX}{name}.base_layer.weight" in state)


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
