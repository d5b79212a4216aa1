"""VPT-Deep: learned prompt tokens join the input of every block, and VPT-Deep+AOFT.

Block ``l`` computes ``block_l([x; P_l])`` and keeps its first ``N`` outputs (those of
``x``): the prompts' outputs are dropped and the next block gets fresh prompts. ``P_l``
is ``(n, d)``:

- ``aoft=False``: free tokens, Xavier-uniform (bound ``sqrt(6 / (n + d))``);
- ``aoft=True`` (VPT-Deep+AOFT): ``P_l = AO(q_l)^T``, ``n`` orthonormal prompts
  generated from one vector ``q_l`` in ``R^d`` per block (``d`` parameters per block).

Prompts change what every token attends to from the first step on: unlike the weight-delta
methods the model does not start as the pre-trained one, and nothing can be merged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .aoft import INITS, _init_vectors, ao_columns
from .blocks import BlockMethod, BlockOptions, NotMergeable, output_width, run_with_prompts
from .registry import BOOL, POSITIVE_INT, choice, option, register_method


class PromptedBlock(NotMergeable):
    """A block run with ``n`` prompt tokens appended to its input."""

    why = "prompt tokens join the attention of every input; no weight absorbs them"

    def __init__(self, base_layer: nn.Module, num_prompts: int, aoft: bool = False,
                 init: str = "unit"):
        super().__init__()
        self.base_layer = base_layer
        d = self.width = output_width(base_layer)
        n = self.num_prompts = num_prompts
        self.aoft = aoft
        if aoft:
            if n > d:
                raise ValueError(f"vpt_deep num_prompts={n} exceeds the width {d} that AOFT "
                                 "generates from")
            self.vpt_q = nn.Parameter(_init_vectors(1, d, init)[0])
        else:
            bound = math.sqrt(6.0 / (n + d))
            self.vpt_prompts = nn.Parameter(torch.empty(n, d).uniform_(-bound, bound))

    def prompts(self) -> torch.Tensor:
        """``(n, d)``."""
        return ao_columns(self.vpt_q, self.num_prompts).t() if self.aoft else self.vpt_prompts

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return run_with_prompts(self.base_layer, x, self.prompts(), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_prompts={self.num_prompts}, aoft={self.aoft}"


@dataclass
class VPTDeepOptions(BlockOptions):
    num_prompts: int = option(10, POSITIVE_INT, "prompt tokens per block")
    aoft: bool = option(False, BOOL, "generate each block's prompts from one vector (AOFT)")
    init: str = option("unit", choice(*INITS), "init of the AOFT generating vectors")


@register_method
class VPTDeep(BlockMethod):
    name = "vpt_deep"
    Options = VPTDeepOptions

    def wrap(self, name: str, module: nn.Module) -> PromptedBlock:
        o = self.options
        return PromptedBlock(module, o.num_prompts, o.aoft, o.init)
