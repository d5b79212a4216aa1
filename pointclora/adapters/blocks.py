"""What the methods that act on whole transformer blocks share: the ``blocks`` option read
from the model, a wrapper that keeps the block as ``base_layer``, and prompt tokens.

A block is any module called as ``block(x)`` with ``x (B, N, D)`` and returning the same
shape: Point-MAE / Point-BERT blocks (called as ``block(x + pos)``) and timm ViT blocks
alike. Blocks are permutation-equivariant over tokens (positions enter before the block),
so prompts are appended after the last token and the block's output is cut back to the
first ``N`` tokens: nothing downstream sees them unless a method says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import AdapterLayer
from .registry import NAMES, Check, FrozenBackboneOptions, Method, option

CHILD_NAMES = Check(
    lambda v: isinstance(v, (list, tuple)) and bool(v) and all(isinstance(c, str) and c for c in v),
    "a non-empty list of child-module names")


@dataclass
class BlockOptions(FrozenBackboneOptions):
    blocks: list[str] | str | None = option(
        None, NAMES, "names of the transformer blocks", model_default="blocks", needed_if=True)


def block_children(blocks: list[str] | str, children: list[str]) -> list[str] | str:
    """A name pattern for the children ``children`` of every block matched by ``blocks``."""
    if isinstance(blocks, str):
        alternatives = "|".join(re.escape(c) for c in children)
        return rf"(?:{blocks})\.(?:{alternatives})"
    return [f"{b}.{c}" for b in blocks for c in children]


def output_width(module: nn.Module) -> int:
    """Width of a branch's output: ``out_features`` of its last ``nn.Linear``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}: it holds "
                         "no nn.Linear; name sites whose last layer is an nn.Linear")
    return linears[-1].out_features


class BlockMethod(Method):
    """A method whose wrappers replace the model's blocks (``BlockOptions.blocks``)."""

    target_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Module,)

    def targets(self) -> list[str] | str | None:
        return self.options.blocks


class NotMergeable(AdapterLayer):
    """A wrapper whose output depends on the input in a way no weight can absorb."""

    why: ClassVar[str] = "its output is not a fixed change of a weight"

    def merge(self) -> nn.Module:
        raise NotImplementedError(
            f"{type(self).__name__} cannot be merged into the backbone: {self.why}. Keep the "
            "adapted model (adapter_state_dict / load_adapter save and restore it); "
            "the weight-delta methods (lora, aoft, ...) merge")


def run_with_prompts(block: nn.Module, x: torch.Tensor, prompts: torch.Tensor, *args,
                     keep: bool = False, **kwargs) -> torch.Tensor:
    """``block([x; prompts])`` cut back to ``x``'s tokens (``keep``: all of them).

    ``prompts (P, D)`` are shared by the batch, ``(B, P, D)`` per sample."""
    if prompts.dim() == 2:
        prompts = prompts.expand(x.shape[0], -1, -1)
    out = block(torch.cat((x, prompts.to(x.dtype)), dim=1), *args, **kwargs)
    return out if keep else out[:, : x.shape[1]]
