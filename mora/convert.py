"""Load adapters saved by the official MoRA code (kongds/MoRA, a fork of peft 0.9).

What its ``save_pretrained`` writes, and what each part becomes here:

- ``adapter_config.json``: ``use_mora``, the integer ``mora_type`` (our named operator and group
  layout, :data:`mora.operators.OFFICIAL_MORA_TYPES`), ``r`` (its r̂ rule is our default
  ``rounding="nearest"``), ``lora_dropout``, ``target_modules``, ``layers_to_transform`` /
  ``layers_pattern`` and ``modules_to_save``. Which modules get MoRA is decided by peft's own
  matcher: a list names a module exactly or by a ``.name`` suffix, a string is a regular
  expression matched in full against the module name. A module whose name ends (plain string
  suffix) with a ``modules_to_save`` entry is peft 0.9's "module to save" and never gets MoRA.
- ``adapter_model.safetensors`` / ``.bin``: each M, an ``nn.Linear(r̂, r̂)`` registered twice, as
  ``lora_A`` and ``lora_B`` of the same layer, so under two keys such as
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Its layer computes
  ``lora_A(f_comp(x)) = f_comp(x) @ Mᵀ``, our ``MoRAAdapter.M``'s orientation, so M is copied as
  is. A module to save (embeddings, head, norms in its pretraining run, ``--train_embhead``) is
  stored whole under its plain name, ``base_model.model.lm_head.weight``: peft 0.9 drops the
  wrapper's ``modules_to_save.default.`` from the key.
- ReMoRA (``--use_relora`` with ``--use_mora``): every T steps its callback merges ΔW into the base
  weight, zeroes M, switches each layer's ``mora_type`` in memory (1→2→3→4→1, or 1↔2) and writes
  the merged inner model to ``base-model/`` beside the adapter; ``adapter_config.json`` keeps the
  starting type. Neither the type nor the merged base can be read from the adapter alone: the
  caller passes ``mora_type=`` and ``merged_base=``, and loading warns when it cannot tell.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .adapters import AdapterConfig, inject_adapters, load_adapter_state_dict, mora_layers
from .operators import OFFICIAL_MORA_TYPES
from .restarts import next_groups

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
_PREFIX = "base_model.model."
REMORA_TYPES = (1, 2, 3, 4)  # the types its restart callback cycles through (type 6 has no successor there)
_SWITCH = {4: "cycle4", 2: "pair"}  # its train.py's --remora_types → our group-switch policy
REMORA_BASE = "base-model"  # what its restart callback writes beside the adapter


class OfficialCheckpointWarning(UserWarning):
    """Loading an official checkpoint may not reproduce the trained model (see the message)."""


# ----------------------------------------------------------------------------- config

def adapter_config_from_official(official: dict, mora_type: int | None = None,
                                 target_modules: tuple[str, ...] | None = None,
                                 trainable_modules: tuple[str, ...] = ()) -> AdapterConfig:
    """Our :class:`AdapterConfig` for an official ``adapter_config.json`` (``use_mora`` true).

    ``mora_type`` overrides the file's (a ReMoRA run switches it without saving it);
    ``target_modules`` replaces the file's list by resolved module names (:func:`official_targets`).
    """
    _check_official_fields(official)
    saved = int(official.get("mora_type", 1))
    mora_type = saved if mora_type is None else mora_type
    if mora_type not in OFFICIAL_MORA_TYPES:
        raise ValueError(f"mora_type must be one of {sorted(OFFICIAL_MORA_TYPES)}, got {mora_type}")
    if (saved == 6) != (mora_type == 6):
        raise ValueError(f"mora_type={mora_type} overrides the file's {saved}: ReMoRA only switches among "
                         f"{REMORA_TYPES}; 6 (rotation) has another r̂ and is never switched to or from")
    operator, compress_groups, decompress_groups = OFFICIAL_MORA_TYPES[mora_type]
    if target_modules is None:
        targets = official.get("target_modules") or ()
        if isinstance(targets, str):
            raise ValueError(f"target_modules={targets!r} is a regular expression: resolve it against the model "
                             "with official_targets() (load_official_adapter does)")
        target_modules = tuple(targets)
    return AdapterConfig(method="mora", rank=int(official["r"]), dropout=float(official.get("lora_dropout", 0.0)),
                         target_modules=tuple(target_modules), trainable_modules=tuple(trainable_modules),
                         operator=operator, compress_groups=compress_groups, decompress_groups=decompress_groups,
                         padding="wrap", rounding="nearest",
                         extra={"official": {"mora_type": mora_type, "saved_mora_type": saved,
                                             "target_modules": _jsonable(official.get("target_modules")),
                                             "modules_to_save": official.get("modules_to_save")}})


def _check_official_fields(official: dict) -> None:
    if "config" in official and "r" not in official:
        raise ValueError("adapter_config.json was written by this library (mora.save_adapter), not by the "
                         "official code: load it with mora.load_adapter")
    if not official.get("use_mora", False):
        raise ValueError("adapter_config.json has use_mora=false: a plain LoRA adapter, not MoRA")
    if official.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_config.json has peft_type={official['peft_type']!r}; MoRA checkpoints say 'LORA'")
    if official.get("rank_pattern"):
        raise ValueError(f"rank_pattern={official['rank_pattern']} (a per-module r, hence r̂) is not supported")
    if official.get("use_dora", False):
        raise ValueError("use_dora=true with use_mora: the fork applies MoRA and ignores DoRA's magnitude; "
                         "not supported")


def _jsonable(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def official_targets(model: nn.Module, official: dict) -> tuple[list[str], list[str]]:
    """(modules that get MoRA, modules to save), by name, as peft 0.9 chooses them in ``model``.

    A module to save is one whose name ends with a ``modules_to_save`` entry (peft 0.9's plain
    ``str.endswith``); it is skipped as a target. The rest go through peft's
    ``check_target_module_exists`` (regex, exact name or ``.name`` suffix, ``layers_to_transform``).
    """
    targets = official.get("target_modules")
    if not targets:
        raise ValueError("adapter_config.json names no target_modules (peft fills them in before it saves)")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise ValueError("target_modules='all-linear' is expanded by peft before it saves a config; "
                         "this one was not written by peft's save_pretrained")
    matcher = SimpleNamespace(target_modules=targets, layers_to_transform=official.get("layers_to_transform"),
                              layers_pattern=official.get("layers_pattern"), exclude_modules=None,
                              modules_to_save=None, target_parameters=None)
    to_save = tuple(official.get("modules_to_save") or ())
    chosen, saved = [], []
    for name, module in model.named_modules():
        if to_save and name and any(name.endswith(entry) for entry in to_save):
            saved.append(name)
        elif name and check_target_module_exists(matcher, name):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target_modules={targets!r} matches {name} ({type(module).__name__}); "
                                 "MoRA adapts nn.Linear modules only")
            chosen.append(name)
    if not chosen:
        raise ValueError(f"target_modules={targets!r} (layers_to_transform="
                         f"{official.get('layers_to_transform')!r}) matches no module of the model")
    return chosen, saved


# ----------------------------------------------------------------------------- tensors

def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys → ours, prefix ``base_model.model.`` removed.

    ``<module>.lora_A[.<name>].weight`` → ``<module>.mora.M``; the duplicate ``lora_B`` must equal it
    (it is the same module there). Any other tensor (a module to save, a bias) keeps its name,
    without the ``modules_to_save.`` wrapper segment; a wrapper's ``original_module`` copy (the
    untrained base weight) is dropped. Other ``lora_*`` keys are not MoRA's and are refused.
    """
    converted: dict[str, torch.Tensor] = {}
    duplicates: list[tuple[str, torch.Tensor]] = []
    for key, tensor in state.items():
        name = key.removeprefix(_PREFIX)
        if ".original_module." in name:
            continue
        if "lora_" in name:
            match = _LORA_KEY.match(name)
            if match is None:
                raise KeyError(f"not an official MoRA adapter key: {key!r}")
            target, first = f"{match['module']}.mora.M", match["side"] == "A"
        else:
            target, first = name.replace(".modules_to_save.", "."), True
        if first and target not in converted:
            converted[target] = tensor
        else:
            duplicates.append((target, tensor))
    for key, tensor in duplicates:
        if key not in converted or not torch.equal(converted[key], tensor):
            what = "lora_B differs from lora_A" if key.endswith(".mora.M") else "two differing copies"
            raise ValueError(f"{key}: {what}; not a MoRA checkpoint of the official code")
    return converted


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_weights(directory: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The first of ``names`` in ``directory``; an ``.index.json`` reads its shards."""
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_tensors(directory / shard).items()}
        return _read_tensors(path)
    raise FileNotFoundError(f"none of {list(names)} in {directory}")


# ----------------------------------------------------------------------------- loading

def load_official_adapter(model: nn.Module, directory: str | Path, *, mora_type: int | None = None,
                          merged_base: str | Path | None = None, strict: bool = True) -> AdapterConfig:
    """Inject MoRA into ``model`` as the official checkpoint in ``directory`` describes; load M and
    the modules to save (embeddings, head, norms).

    Args:
        mora_type: the type the layers had when the checkpoint was written. A ReMoRA run switched
            it in memory and its file keeps the starting type (:func:`remora_mora_type` gives the
            type after n restarts). Without it a file of type 1–4 loads with a warning.
        merged_base: the ``base-model/`` folder a ReMoRA run writes at each restart (its merged
            ΔW); loaded into ``model`` before the adapter (:func:`load_official_merged_base`).
        strict: a module the config targets or names to save that gets no tensor from the file,
            or a tensor nothing in the model takes, is an error; ``strict=False`` warns instead
            (the module keeps M = 0 or its base value; the tensor is skipped).
    """
    directory = Path(directory)
    official = json.loads((directory / "adapter_config.json").read_text())
    _check_official_fields(official)
    _warn_unconfirmed(directory, official, mora_type, merged_base)
    if merged_base is not None:
        load_official_merged_base(model, merged_base)
    targets, to_save = official_targets(model, official)
    leaves = tuple(sorted({name.rsplit(".", 1)[-1] for name in to_save}))
    config = adapter_config_from_official(official, mora_type, tuple(targets), leaves)
    state = convert_official_state_dict(
        _read_weights(directory, ("adapter_model.safetensors", "adapter_model.bin")))
    inject_adapters(model, config)
    if sorted(mora_layers(model)) != sorted(targets):
        raise RuntimeError(f"injected MoRA into {sorted(mora_layers(model))}, peft's rule chose {sorted(targets)}")
    state = _checked_coverage(model, state, targets, to_save, strict)
    _check_tied(model, state)
    load_adapter_state_dict(model, state)
    return config


def _checked_coverage(model: nn.Module, state: dict, targets: list[str], to_save: list[str],
                      strict: bool) -> dict:
    """``state`` without the tensors nothing takes; raise (or warn) about gaps on either side."""
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    unused = sorted(k for k in state if k not in own)
    missing = [f"{t}.mora.M" for t in targets if f"{t}.mora.M" not in state]
    missing += [f"{m}.{p}" for m in to_save for p, _ in model.get_submodule(m).named_parameters()
                if f"{m}.{p}" not in state]
    problems = []
    if missing:
        problems.append(f"{len(missing)} module(s) the config targets or saves get no tensor from the file "
                        f"(they would keep M = 0 or the base value): {missing[:6]}")
    if unused:
        problems.append(f"{len(unused)} tensor(s) of the file are taken by nothing in the model "
                        f"(other target_modules, layers_to_transform or base model?): {unused[:6]}")
    if problems and strict:
        raise ValueError("; ".join(problems) + ". Pass strict=False to load anyway.")
    for problem in problems:
        warnings.warn(problem, OfficialCheckpointWarning, stacklevel=3)
    return {k: v for k, v in state.items() if k in own}


def _check_tied(model: nn.Module, state: dict) -> None:
    """Two saved tensors that are one tensor in ``model`` (a tied head) must agree."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    for names in by_tensor.values():
        saved = [n for n in names if n in state]
        if len(saved) > 1 and not all(torch.equal(state[saved[0]], state[n]) for n in saved[1:]):
            raise ValueError(f"{saved} are one tied tensor in the model but differ in the checkpoint "
                             "(trained as separate modules to save): untie them in the model first")


def load_official_merged_base(model: nn.Module, directory: str | Path) -> None:
    """Load the ``base-model/`` folder of an official ReMoRA run into a plain ``model``.

    Its restart callback saves the inner transformer (``LlamaModel``, keys without ``model.``)
    still wrapped by peft: a targeted Linear's merged weight as ``<name>.base_layer.weight``, M
    (just zeroed) as ``lora_A``, a module to save as ``original_module`` and
    ``modules_to_save.default``. The merged weights and trained copies load; M and the untrained
    copies are skipped. Call before injecting the adapter.
    """
    if mora_layers(model):
        raise RuntimeError("load the merged base into the plain model, before the adapter is injected")
    directory = Path(directory)
    raw = _read_weights(directory, ("model.safetensors", "model.safetensors.index.json",
                                    "pytorch_model.bin", "pytorch_model.bin.index.json"))
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    state, unknown = {}, []
    for key, tensor in raw.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if name not in own and prefix:
            name = f"{prefix}.{name}"
        if name in own:
            state[name] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{directory}: {len(unknown)} tensor(s) match no parameter of the model: {unknown[:6]}")
    if not state:
        raise ValueError(f"{directory}: holds no merged weight for this model")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{name}: merged base shape {tuple(tensor.shape)} != model {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- ReMoRA

def remora_mora_type(start: int, restarts: int, remora_types: int = 4) -> int:
    """The official ``mora_type`` after ``restarts`` ReMoRA restarts from ``start``.

    Its ``train.py`` restarts every ``--use_relora_step`` steps (also at the last step when it
    divides ``--max_steps``) and maps 1→2→3→4→1 with ``--remora_types 4`` (its default), 1↔2
    otherwise; a checkpoint at step s has seen s // T restarts.
    """
    if remora_types not in _SWITCH:
        raise ValueError(f"remora_types must be one of {sorted(_SWITCH)}, got {remora_types}")
    allowed = REMORA_TYPES if remora_types == 4 else (1, 2)
    if start not in allowed:
        raise ValueError(f"the official ReMoRA with remora_types={remora_types} cannot start from type {start} "
                         f"(its map has {allowed} only)")
    by_groups = {groups[1:]: t for t, groups in OFFICIAL_MORA_TYPES.items() if t in REMORA_TYPES}
    groups = OFFICIAL_MORA_TYPES[start][1:]
    for _ in range(restarts):
        groups = next_groups(groups, _SWITCH[remora_types])
    return by_groups[groups]


def remora_evidence(directory: str | Path) -> list[Path]:
    """``base-model/`` folders that say ``directory`` comes from an official ReMoRA run: beside the
    adapter (the final save) or beside its ``checkpoint-N`` folder (the trainer's saves)."""
    directory = Path(directory)
    return [d / REMORA_BASE for d in (directory, directory.parent) if (d / REMORA_BASE).is_dir()]


def _warn_unconfirmed(directory: Path, official: dict, mora_type: int | None, merged_base) -> None:
    saved = int(official.get("mora_type", 1))
    evidence, step = remora_evidence(directory), _trainer_step(directory)
    notes = []
    if evidence and merged_base is None:
        notes.append(f"{evidence[0]} is what the official ReMoRA restarts write: the merged updates live there, "
                     f"not in the adapter; pass merged_base={str(evidence[0])!r} (it holds the merges up to the "
                     f"run's last restart, which may be later than this checkpoint{step})")
    if mora_type is None and saved in REMORA_TYPES:
        notes.append(f"adapter_config.json says mora_type={saved}, but a ReMoRA run switches the type in "
                     "memory at each restart and never updates that file; pass mora_type= to confirm it "
                     f"(after n restarts: remora_mora_type({saved}, n){step})")
    if notes:
        warnings.warn(f"{directory}: " + "; ".join(notes) + ".", OfficialCheckpointWarning, stacklevel=3)


def _trainer_step(directory: Path) -> str:
    path = directory / "trainer_state.json"
    if not path.exists():
        return ""
    step = json.loads(path.read_text()).get("global_step")
    return f"; trainer_state.json: global_step={step}, so n = {step} // T with restarts every T steps"
