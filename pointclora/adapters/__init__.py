"""Parameter-efficient fine-tuning methods, one module each, found through a registry.

Importing a method module registers it; the order below is the order of ``METHODS``.
"""
from . import full, linear, lora, clora, serial_lora, aoft  # noqa: F401,I001  (registration order)
from . import adapter, vpt_deep, idpt, dapt, pointgst  # noqa: F401,I001
from .aoft import AOFT, AOFTLinear, AOFTOptions, ao_columns
from .api import (
    adapter_config,
    adapter_state_dict,
    apply_adapter,
    backbone_fingerprint,
    load_adapter,
    merge_adapter,
    parameter_report,
    regularization_loss,
    resolve_options,
    trained_keys,
)
from .base import AdapterLayer, LowRankLinear
from .clora import CLoRA, CLoRABank, CLoRALinear, CLoRAOptions, sade
from .lora import LoRA, LoRALinear, LoRAOptions
from .registry import (
    DEFAULT_OPTIONS,
    METHOD_REGISTRY,
    METHODS,
    FrozenBackboneOptions,
    LowRankOptions,
    Method,
    Options,
    SplitQKVOptions,
    get_method,
    model_defaults,
    register_method,
    register_model_defaults,
)
from .serial_lora import SerialLoRA, SerialLoRALinear, SerialLoRAOptions

__all__ = [
    "AOFT", "AOFTLinear", "AOFTOptions", "AdapterLayer", "CLoRA", "CLoRABank", "CLoRALinear",
    "CLoRAOptions", "DEFAULT_OPTIONS", "FrozenBackboneOptions", "LoRA", "LoRALinear",
    "LoRAOptions", "LowRankLinear", "LowRankOptions", "METHODS", "METHOD_REGISTRY", "Method",
    "Options", "SerialLoRA", "SerialLoRALinear", "SerialLoRAOptions", "SplitQKVOptions",
    "adapter_config", "adapter_state_dict", "ao_columns", "apply_adapter",
    "backbone_fingerprint", "get_method", "load_adapter", "merge_adapter", "model_defaults",
    "parameter_report", "register_method", "register_model_defaults", "regularization_loss",
    "resolve_options", "sade", "trained_keys",
]
