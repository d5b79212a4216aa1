"""Bottleneck adapters after the attention and after the FFN of every block (Houlsby et
al.), and their AOFT variants (the AOFT paper's Adapter, Adapter+AOFT and Adapter+AOFT*).

At each site, a branch ``y = f(...)`` of a block (its ``attn`` and its ``mlp``, before the
residual sum) becomes ``y + s (up act(down y + b_down) + b_up)`` with ``down (k, d)`` and
``up (d, k)``. ``aoft`` picks how the two projections are made:

- ``none``: free matrices, ``down`` Kaiming-uniform as LoRA's ``A``, ``up = 0``;
- ``star`` (Adapter+AOFT*): ``down = AO(q_down)^T``, ``up = AO(q_up) diag(lambda)``,
  ``lambda = 0`` at the start;
- ``plain`` (Adapter+AOFT): ``down = AO(q_down)^T``, ``up`` a free matrix starting at 0.

Biases start at zero, so the model starts as the pre-trained one. The activation makes the
adapter depend on the input nonlinearly: it cannot be merged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .aoft import INITS, _init_vectors, ao_columns
from .base import low_rank_pair
from .blocks import (
    CHILD_NAMES,
    BlockMethod,
    BlockOptions,
    NotMergeable,
    block_children,
    output_width,
)
from .registry import POSITIVE, POSITIVE_INT, choice, option, register_method

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
GENERATORS = ("none", "star", "plain")


class BottleneckAdapter(NotMergeable):
    """A branch of a block followed by a residual bottleneck adapter."""

    why = "the adapter's bottleneck is nonlinear in the input"

    def __init__(self, base_layer: nn.Module, bottleneck: int, scale: float = 1.0,
                 act: str = "gelu", aoft: str = "none", init: str = "unit"):
        super().__init__()
        if act not in ACTIVATIONS or aoft not in GENERATORS or init not in INITS:
            raise ValueError(f"act must be one of {list(ACTIVATIONS)}, aoft one of "
                             f"{list(GENERATORS)}, init one of {list(INITS)}; got {act!r}, "
                             f"{aoft!r}, {init!r}")
        self.base_layer = base_layer
        d = self.width = output_width(base_layer)
        k = self.bottleneck = bottleneck
        if aoft != "none" and k > d:
            raise ValueError(f"adapter bottleneck={k} exceeds the width {d} that AOFT "
                             "generates from")
        self.scale, self.act, self.aoft = scale, act, aoft
        down, up = low_rank_pair(1, k, d, d)
        if aoft == "none":
            self.adapter_down = nn.Parameter(down[0])
        else:
            self.adapter_q_down = nn.Parameter(_init_vectors(1, d, init)[0])
        if aoft == "star":
            self.adapter_q_up = nn.Parameter(_init_vectors(1, d, init)[0])
            self.adapter_lambda = nn.Parameter(torch.zeros(k))
        else:
            self.adapter_up = nn.Parameter(up[0])
        self.adapter_down_bias = nn.Parameter(torch.zeros(k))
        self.adapter_up_bias = nn.Parameter(torch.zeros(d))

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``down (k, d)`` and ``up (d, k)``."""
        k = self.bottleneck
        down = self.adapter_down if self.aoft == "none" else \
            ao_columns(self.adapter_q_down, k).t()
        up = ao_columns(self.adapter_q_up, k) * self.adapter_lambda if self.aoft == "star" \
            else self.adapter_up
        return down, up

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(*args, **kwargs)
        down, up = self.projections()
        hidden = ACTIVATIONS[self.act](F.linear(y, down.to(y.dtype),
                                                self.adapter_down_bias.to(y.dtype)))
        return y + self.scale * F.linear(hidden, up.to(y.dtype), self.adapter_up_bias.to(y.dtype))

    def extra_repr(self) -> str:
        return f"width={self.width}, bottleneck={self.bottleneck}, aoft={self.aoft}"


@dataclass
class AdapterOptions(BlockOptions):
    sites: list[str] = option(("attn", "mlp"), CHILD_NAMES,
                              "children of every block followed by an adapter")
    bottleneck: int = option(8, POSITIVE_INT, "bottleneck width k")
    scale: float = option(1.0, POSITIVE, "s, multiplies the adapter's output")
    act: str = option("gelu", choice(*ACTIVATIONS), "bottleneck activation")
    aoft: str = option("none", choice(*GENERATORS),
                       "none: free projections; star: Adapter+AOFT*; plain: Adapter+AOFT")
    init: str = option("unit", choice(*INITS), "init of the AOFT generating vectors")


@register_method
class Adapter(BlockMethod):
    name = "adapter"
    Options = AdapterOptions

    def targets(self) -> list[str] | str:
        return block_children(self.options.blocks, self.options.sites)

    def wrap(self, name: str, module: nn.Module) -> BottleneckAdapter:
        o = self.options
        return BottleneckAdapter(module, o.bottleneck, o.scale, o.act, o.aoft, o.init)
