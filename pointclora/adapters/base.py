"""Common base of the weight-delta wrappers around a frozen ``nn.Linear``.

Every method here adds a delta ``Delta W`` that does not depend on the input, so one
``delta_weight()`` serves both the forward pass (``(W + Delta W) x + b``) and the merge
(``W <- W + Delta W``): the adapted and the merged model compute the same matmul.
Forming ``Delta W`` costs ``d_in * d_out * r`` once per step, independent of the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BASE_LAYER = "base_layer"


class LowRankLinear(nn.Module):
    """A frozen linear layer plus a learned weight delta.

    ``n_slices`` splits the output rows into equal slices that are adapted independently,
    so a fused ``qkv`` projection carries separate q, k and v modules.
    Subclasses implement ``slice_deltas()`` (``(n_slices, out/n_slices, in)``).
    """

    def __init__(self, base_layer: nn.Linear, n_slices: int = 1):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"expected an nn.Linear to wrap, got {type(base_layer).__name__}")
        if n_slices < 1 or base_layer.out_features % n_slices:
            raise ValueError(
                f"cannot split out_features={base_layer.out_features} into {n_slices} "
                "equal slices"
            )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.n_slices = n_slices
        self.slice_out = base_layer.out_features // n_slices

    def slice_deltas(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``Delta W`` in ``nn.Linear`` layout ``(out_features, in_features)``."""
        return self.slice_deltas().reshape(self.out_features, self.in_features)

    def regularization(self) -> torch.Tensor | None:
        """Weighted regulariser of this module, or None when the method has none."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        return F.linear(x, weight + self.delta_weight().to(weight.dtype), self.base_layer.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the delta into the wrapped layer and return that layer."""
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"n_slices={self.n_slices}"


def low_rank_pair(n: int, r: int, d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``A (n, r, d_in)`` Kaiming-uniform as in LoRA and ``B (n, d_out, r)`` zero: B A = 0."""
    a = torch.empty(n, r, d_in)
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, d_in) matrix
    nn.init.uniform_(a, -bound, bound)
    return nn.Parameter(a), nn.Parameter(torch.zeros(n, d_out, r))
