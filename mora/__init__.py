"""mora: MoRA (Jiang et al., 2024) and the paper's baselines as small, testable PyTorch modules.

    from mora import AdapterConfig, inject_adapters
    inject_adapters(model, AdapterConfig(method="mora", rank=8, operator="rotate"))

The methods are registered in :mod:`mora.methods`; ReLoRA/ReMoRA restarts are :mod:`mora.restarts`.
See README.md for which parts come from peft and which are written here.
"""

from .adapters import (
    LLAMA_TARGETS, AdapterConfig, adapter_layers, adapter_parameters, adapter_state_dict, adapter_summary,
    build_optimizer, effective_weight, inject_adapters, load_adapter, load_adapter_state_dict, lora_layers, merge_adapters,
    merge_and_unload, mora_layers, save_adapter, trainable_parameter_count, unmerge_adapters,
)
from .budget import lora_parameter_count, mora_r_hat
from .convert import adapter_config_from_official, convert_official_state_dict, load_official_adapter
from .layer import MoRAAdapter, MoRALinear
from .methods import METHOD_LAYERS, METHODS, Method, get_method, register_method
from .operators import GROUP_KINDS, OFFICIAL_MORA_TYPES, OPERATORS, PADDINGS, MoRALayout, mora_delta_weight
from .restarts import (
    CYCLE4_ORDER, GROUP_SWITCHES, RestartConfig, check_restarts, merge_and_reinit, next_groups,
    reset_adapter_optimizer_state, restart_adapters,
)

__all__ = [
    "AdapterConfig", "CYCLE4_ORDER", "GROUP_KINDS", "GROUP_SWITCHES", "LLAMA_TARGETS", "METHODS",
    "METHOD_LAYERS", "Method", "MoRAAdapter", "MoRALayout", "MoRALinear", "OFFICIAL_MORA_TYPES", "OPERATORS",
    "PADDINGS", "RestartConfig", "adapter_config_from_official", "adapter_layers", "adapter_parameters",
    "adapter_state_dict", "adapter_summary", "build_optimizer", "check_restarts", "convert_official_state_dict",
    "effective_weight",
    "get_method", "inject_adapters", "load_adapter", "load_adapter_state_dict", "load_official_adapter",
    "lora_layers", "lora_parameter_count", "merge_adapters", "merge_and_reinit", "merge_and_unload",
    "mora_delta_weight", "mora_layers", "mora_r_hat", "next_groups", "register_method",
    "reset_adapter_optimizer_state", "restart_adapters", "save_adapter", "trainable_parameter_count",
    "unmerge_adapters",
]
