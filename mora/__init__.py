"""mora: MoRA (Jiang et al., 2024) and the paper's baselines as small, testable PyTorch modules.

    from mora import AdapterConfig, inject_adapters
    inject_adapters(model, AdapterConfig(method="mora", rank=8, operator="rotate"))

See README.md for which parts come from peft and which are written here.
"""

from .adapters import (
    LLAMA_TARGETS, METHOD_LAYERS, AdapterConfig, adapter_layers, adapter_state_dict, adapter_summary,
    build_optimizer, inject_adapters, load_adapter, lora_layers, merge_adapters, merge_and_reinit,
    merge_and_unload, mora_layers, save_adapter, trainable_parameter_count, unmerge_adapters,
)
from .budget import lora_parameter_count, mora_r_hat
from .convert import adapter_config_from_official, convert_official_state_dict, load_official_adapter
from .layer import MoRAAdapter, MoRALinear
from .operators import GROUP_KINDS, OFFICIAL_MORA_TYPES, OPERATORS, PADDINGS, MoRALayout, mora_delta_weight

__all__ = [
    "AdapterConfig", "GROUP_KINDS", "LLAMA_TARGETS", "METHOD_LAYERS", "MoRAAdapter", "MoRALayout",
    "MoRALinear", "OFFICIAL_MORA_TYPES", "OPERATORS", "PADDINGS", "adapter_config_from_official",
    "adapter_layers", "adapter_state_dict", "adapter_summary", "build_optimizer",
    "convert_official_state_dict", "inject_adapters", "load_adapter", "load_official_adapter",
    "lora_layers", "lora_parameter_count", "merge_adapters", "merge_and_reinit", "merge_and_unload",
    "mora_delta_weight", "mora_layers", "mora_r_hat", "save_adapter", "trainable_parameter_count",
    "unmerge_adapters",
]
