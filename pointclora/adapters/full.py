"""Full fine-tuning: every parameter and every BatchNorm statistic trains (the baseline)."""
from __future__ import annotations

from .registry import FullOptions, Method, register_method


@register_method
class Full(Method):
    name = "full"
    Options = FullOptions
    trains_backbone = True
