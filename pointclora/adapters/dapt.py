"""DAPT: a dynamic adapter beside every FFN, whose output also makes internal prompts, and
a scale-shift after every linear and norm layer of the blocks.

In each block, with ``h`` the input of the FFN (``mlp``):

- dynamic adapter, parallel to the FFN: ``a(h) = ReLU(w_s^T LN(h) + b_s) *
  (up GELU(down LN(h) + b_down) + b_up)`` (a per-token scale), ``mlp(h) + a(h)``;
- internal prompt: ``p = gamma_p * mean_tokens(GELU(a(h))) + beta_p`` joins the sequence
  after the block and stays there for every later block (one more prompt per block, never
  given a position);
- scale-shift ``y * gamma + beta`` after every ``nn.Linear`` and ``nn.LayerNorm`` of the
  block (Point-MAE: ``qkv``, ``proj``, ``fc1``, ``fc2``, ``norm1``, ``norm2``).

``up = 0``, ``gamma = 1``, ``beta = 0`` at the start, so the adapter and the scale-shifts
start as the identity; the prompts (zero vectors at first) join the attention at once.
With ``keep_prompts`` the last block also returns the prompts, so the model's own head
reads them (Point-MAE: in the max over tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockMethod, BlockOptions, NotMergeable, output_width
from .registry import BOOL, POSITIVE_INT, Check, option, register_method

PROBABILITY = Check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0 <= v < 1, "a number in [0, 1)")


class ScaleShift(nn.Module):
    """``layer(x) * gamma + beta`` per output channel."""

    def __init__(self, base_layer: nn.Module, width: int):
        super().__init__()
        self.base_layer = base_layer
        self.dapt_gamma = nn.Parameter(torch.ones(width))
        self.dapt_beta = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.dapt_beta, self.base_layer(x), self.dapt_gamma)


class DynamicAdapterFFN(nn.Module):
    """The FFN plus the dynamic adapter beside it; keeps the adapter's last output."""

    def __init__(self, base_layer: nn.Module, width: int, bottleneck: int, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.dapt_norm = nn.LayerNorm(width)
        self.dapt_scale = nn.Linear(width, 1)
        self.dapt_down = nn.Linear(width, bottleneck)
        self.dapt_up = nn.Linear(bottleneck, width)
        self.dropout = dropout
        for layer in (self.dapt_scale, self.dapt_down):  # Kaiming-uniform weights, zero biases
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.dapt_up.weight)
        nn.init.zeros_(self.dapt_up.bias)
        self.last: torch.Tensor | None = None

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        h = self.dapt_norm(h)
        hidden = F.dropout(F.gelu(self.dapt_down(h)), self.dropout, self.training)
        return F.relu(self.dapt_scale(h)) * self.dapt_up(hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.last = self.adapter(h)
        return self.base_layer(h) + self.last


class _Carry:
    """The prompts handed from block to block within one forward pass."""

    def __init__(self):
        self.count = 0  # blocks wrapped
        self.tokens: torch.Tensor | None = None


class DAPTBlock(NotMergeable):
    """A block with DAPT's adapter and scale-shifts inside, run with the carried prompts."""

    why = "the adapter's scale and the prompts depend on each input"

    def __init__(self, base_layer: nn.Module, carry: _Carry, ffn: str, bottleneck: int,
                 dropout: float, scale_shift: bool, keep_prompts: bool):
        super().__init__()
        d = output_width(base_layer)
        try:
            base_layer.get_submodule(ffn)
        except AttributeError as err:  # checked before the block is changed
            raise ValueError(f"dapt ffn={ffn!r} is not a child of {type(base_layer).__name__}; "
                             "name its feed-forward module") from err
        if scale_shift:
            for name, m in list(base_layer.named_modules()):
                if isinstance(m, (nn.Linear, nn.LayerNorm)):
                    width = m.out_features if isinstance(m, nn.Linear) else m.normalized_shape[0]
                    _set(base_layer, name, ScaleShift(m, width))
        adapted_ffn = DynamicAdapterFFN(base_layer.get_submodule(ffn), d, bottleneck, dropout)
        _set(base_layer, ffn, adapted_ffn)
        self.base_layer = base_layer
        object.__setattr__(self, "ffn", adapted_ffn)  # registered once, inside the block
        self.dapt_prompt_gamma = nn.Parameter(torch.ones(d))
        self.dapt_prompt_beta = nn.Parameter(torch.zeros(d))
        object.__setattr__(self, "carry", carry)  # shared by the blocks, not a child module
        self.index, self.keep_prompts = carry.count, keep_prompts
        carry.count += 1

    def unwrap(self) -> nn.Module:
        """The block as it was: the scale-shifts and the adapter taken out again."""
        block = self.base_layer
        inner = [n for n, m in block.named_modules() if isinstance(m, (ScaleShift,
                                                                       DynamicAdapterFFN))]
        for name in sorted(inner, key=lambda n: -n.count(".")):  # the deepest first
            _set(block, name, block.get_submodule(name).base_layer)
        return block

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        carry, n = self.carry, x.shape[1]
        if self.index == 0:
            carry.tokens = None
        prompts = carry.tokens if carry.tokens is not None else x[:, :0]
        out = self.base_layer(torch.cat((x, prompts.to(x.dtype)), dim=1), *args, **kwargs)
        new = F.gelu(self.ffn.last).mean(dim=1, keepdim=True)
        self.ffn.last = None
        new = torch.addcmul(self.dapt_prompt_beta, new, self.dapt_prompt_gamma)
        carry.tokens = torch.cat((out[:, n:], new), dim=1)
        if self.index < carry.count - 1:
            return out[:, :n]
        tokens, carry.tokens = carry.tokens, None  # the last block: nothing outlives the pass
        return torch.cat((out[:, :n], tokens), dim=1) if self.keep_prompts else out[:, :n]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@dataclass
class DAPTOptions(BlockOptions):
    bottleneck: int = option(64, POSITIVE_INT, "bottleneck width of the dynamic adapter")
    dropout: float = option(0.2, PROBABILITY, "dropout on the adapter's bottleneck")
    ffn: str = option("mlp", Check(lambda v: isinstance(v, str) and bool(v), "a module name"),
                      "the block's feed-forward child that the adapter runs beside")
    scale_shift: bool = option(True, BOOL, "scale-shift after every linear and norm layer")
    keep_prompts: bool = option(True, BOOL, "the last block returns the prompts too")


@register_method
class DAPT(BlockMethod):
    name = "dapt"
    Options = DAPTOptions

    def __init__(self, options: DAPTOptions):
        super().__init__(options)
        self.carry = _Carry()

    def wrap(self, name: str, module: nn.Module) -> DAPTBlock:
        o = self.options
        return DAPTBlock(module, self.carry, o.ffn, o.bottleneck, o.dropout, o.scale_shift,
                         o.keep_prompts)
