"""Load adapters saved by the official MoRA code (kongds/MoRA, a fork of peft 0.9).

The fork stores MoRA's M as an ``nn.Linear(r̂, r̂)`` registered twice, as ``lora_A`` and as
``lora_B`` of the same layer, so its ``adapter_model`` holds each M under two keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (``.lora_A.default.weight``
in memory). Its layer computes ``lora_A(f_comp(x)) = f_comp(x) @ Mᵀ``, the same orientation as
our ``MoRAAdapter.M``, so the tensor is copied as is. Its integer ``mora_type`` becomes our
named operator and group layout (:data:`mora.operators.OFFICIAL_MORA_TYPES`); its r̂ rule is our
default ``rounding="nearest"``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .adapters import AdapterConfig, inject_adapters, load_adapter_state_dict
from .operators import OFFICIAL_MORA_TYPES

_OFFICIAL_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def adapter_config_from_official(official: dict) -> AdapterConfig:
    """Our :class:`AdapterConfig` for an official ``adapter_config.json`` (``use_mora`` true)."""
    if not official.get("use_mora", False):
        raise ValueError("adapter_config.json has use_mora=false: a plain LoRA adapter, not MoRA")
    mora_type = int(official.get("mora_type", 1))
    if mora_type not in OFFICIAL_MORA_TYPES:
        raise ValueError(f"mora_type must be one of {sorted(OFFICIAL_MORA_TYPES)}, got {mora_type}")
    operator, compress_groups, decompress_groups = OFFICIAL_MORA_TYPES[mora_type]
    targets = official.get("target_modules") or ()
    return AdapterConfig(method="mora", rank=int(official["r"]), dropout=float(official.get("lora_dropout", 0.0)),
                         target_modules=tuple([targets] if isinstance(targets, str) else targets),
                         operator=operator, compress_groups=compress_groups, decompress_groups=decompress_groups,
                         padding="wrap", rounding="nearest")


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys → ours: ``<module>.lora_A[.<name>].weight`` → ``<module>.mora.M``.

    The duplicate ``lora_B`` copy must equal ``lora_A`` (it is the same module there).
    """
    converted: dict[str, torch.Tensor] = {}
    duplicates: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _OFFICIAL_KEY.match(key)
        if match is None:
            raise KeyError(f"not an official MoRA adapter key: {key!r}")
        target = f"{match['module']}.mora.M"
        (converted if match["side"] == "A" else duplicates)[target] = tensor
    for key, tensor in duplicates.items():
        if key not in converted or not torch.equal(converted[key], tensor):
            raise ValueError(f"{key}: lora_B differs from lora_A; not a MoRA checkpoint of the official code")
    return converted


def load_official_adapter(model: nn.Module, directory: str | Path) -> AdapterConfig:
    """Inject MoRA into ``model`` as the official checkpoint in ``directory`` describes, load M."""
    directory = Path(directory)
    config = adapter_config_from_official(json.loads((directory / "adapter_config.json").read_text()))
    weights = directory / "adapter_model.safetensors"
    if weights.exists():
        from safetensors.torch import load_file
        state = load_file(str(weights))
    else:
        state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    inject_adapters(model, config)
    load_adapter_state_dict(model, convert_official_state_dict(state))
    return config
