"""Parameter-efficient fine-tuning methods: full, linear, LoRA, CLoRA, Serial LoRA, AOFT."""
from .aoft import AOFTLinear, ao_columns
from .api import (
    DEFAULT_OPTIONS,
    HEAD_PREFIX,
    METHODS,
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
from .base import LowRankLinear
from .clora import CLoRABank, CLoRALinear, sade
from .lora import LoRALinear
from .serial_lora import SerialLoRALinear

__all__ = [
    "AOFTLinear",
    "CLoRABank",
    "CLoRALinear",
    "DEFAULT_OPTIONS",
    "HEAD_PREFIX",
    "LoRALinear",
    "LowRankLinear",
    "METHODS",
    "SerialLoRALinear",
    "adapter_config",
    "adapter_state_dict",
    "ao_columns",
    "apply_adapter",
    "backbone_fingerprint",
    "load_adapter",
    "merge_adapter",
    "parameter_report",
    "regularization_loss",
    "resolve_options",
    "sade",
    "trained_keys",
]
