"""Model cost: FLOPs under the fvcore and module (thop-style) conventions, parameters."""
from .flops import (
    POINT_OP_HANDLES,
    SKIPPED_OP_HANDLES,
    ZERO_COST_REASONS,
    FlopCount,
    fvcore_flops,
    module_macs,
    official_graph,
    sample_points,
)
from .report import build_adapted, complexity_report, methods_table, resolve_model_config

__all__ = [
    "POINT_OP_HANDLES",
    "SKIPPED_OP_HANDLES",
    "ZERO_COST_REASONS",
    "FlopCount",
    "build_adapted",
    "complexity_report",
    "fvcore_flops",
    "methods_table",
    "module_macs",
    "official_graph",
    "resolve_model_config",
    "sample_points",
]
