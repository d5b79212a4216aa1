"""Linear probing: the task head trains, the backbone (tokens included) stays frozen."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import BOOL, FrozenBackboneOptions, Method, option, register_method


@dataclass
class LinearOptions(FrozenBackboneOptions):
    # the cls token belongs to the frozen feature extractor
    train_tokens: bool = option(False, BOOL, "keep the learned tokens trainable")


@register_method
class Linear(Method):
    name = "linear"
    Options = LinearOptions
