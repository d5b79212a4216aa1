"""Serial LoRA: one low-rank pair composed before the frozen projection.

``y = W (x + s B A x) + b``, so on a fused qkv layer q, k and v share the pair; the
merged weight is ``W (I + s B A)``, i.e. ``Delta W = s W B A``, whose factors are
``up = s W B`` (``d_out x r``, ``d_out d_in r`` to form) and ``down = A``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import LowRankLinear, low_rank_pair
from .registry import POSITIVE, LowRankOptions, Method, option, register_method


class SerialLoRALinear(LowRankLinear):
    """``A (r, d_in)`` random, ``B (d_in, r)`` zero: the layer starts as the frozen one."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__(base_layer)
        self.r = r
        self.scaling = alpha / r
        a, b = low_rank_pair(1, r, self.in_features, self.in_features)
        self.serial_A, self.serial_B = nn.Parameter(a[0]), nn.Parameter(b[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.base_layer.weight
        up = self.scaling * (weight @ self.serial_B.to(weight.dtype))
        return up[None], self.serial_A[None].to(weight.dtype)


@dataclass
class SerialLoRAOptions(LowRankOptions):
    alpha: float = option(16.0, POSITIVE, "scale numerator, s = alpha / r")

    @classmethod
    def model_default(cls, key: str, value: Any) -> Any:
        """By default the pair sits before the fused q, k, v projection only (the model's
        default targets whose last name part is ``qkv``), not before the output projection."""
        if key != "target_modules" or value is None:
            return value
        fused = [t for t in value if t.rpartition(".")[2] == "qkv"] if isinstance(value, list) \
            else []  # a regex cannot be narrowed: the user names the targets
        return fused or None


@register_method
class SerialLoRA(Method):
    name = "serial_lora"
    Options = SerialLoRAOptions

    def wrap(self, name: str, module: nn.Linear) -> SerialLoRALinear:
        return SerialLoRALinear(module, self.options.r, self.options.alpha)
