"""LoRA: ``y = W x + s B A x`` with ``s = alpha / r`` and ``B = 0`` at the start."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LowRankLinear, low_rank_pair
from .registry import POSITIVE, Method, SplitQKVOptions, option, register_method


class LoRALinear(LowRankLinear):
    """One ``(A, B)`` pair per output slice (q, k and v get their own pairs on a fused qkv)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, n_slices: int = 1):
        super().__init__(base_layer, n_slices)
        self.r = r
        self.scaling = alpha / r
        self.lora_A, self.lora_B = low_rank_pair(n_slices, r, self.in_features, self.slice_out)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scaling * self.lora_B, self.lora_A


@dataclass
class LoRAOptions(SplitQKVOptions):
    alpha: float = option(16.0, POSITIVE, "scale numerator, s = alpha / r")


@register_method
class LoRA(Method):
    name = "lora"
    Options = LoRAOptions

    def wrap(self, name: str, module: nn.Linear) -> LoRALinear:
        o = self.options
        return LoRALinear(module, o.r, o.alpha, o.n_slices(name))
