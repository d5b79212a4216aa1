"""LoRA: ``y = W x + s B A x`` with ``s = alpha / r`` and ``B = 0`` at the start."""
from __future__ import annotations

import torch
from torch import nn

from .base import LowRankLinear, low_rank_pair


class LoRALinear(LowRankLinear):
    """One ``(A, B)`` pair per output slice (q, k and v get their own pairs on a fused qkv)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, n_slices: int = 1):
        super().__init__(base_layer, n_slices)
        self.r = r
        self.scaling = alpha / r
        self.lora_A, self.lora_B = low_rank_pair(n_slices, r, self.in_features, self.slice_out)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scaling * self.lora_B, self.lora_A
