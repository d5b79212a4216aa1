"""Backbones with their official state-dict layouts, their registry and their checkpoint loader.

Every module of this package is imported with it, so a new backbone is one file whose class
carries ``@register_backbone("name")`` (see docs/architecture.md). Registered classes are
also reachable as ``pointclora.models.<ClassName>``.
"""
import importlib
import pkgutil

from .backbones import HEAD_PREFIX, PointBERT, PointMAE, PointTransformer
from .builder import build_model
from .checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSpec,
    Layout,
    LoadReport,
    UnsafeCheckpointError,
    load_pretrained,
    read_state_dict,
)
from .registry import BACKBONES, register_backbone

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module


def __getattr__(name: str):
    """``pointclora.models.PointMAEPartSeg`` and the like: a registered class by its name."""
    found = next((cls for cls in BACKBONES.values() if cls.__name__ == name), None)
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return found


__all__ = [
    "BACKBONES",
    "HEAD_PREFIX",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointSpec",
    "Layout",
    "LoadReport",
    "PointBERT",
    "PointMAE",
    "PointTransformer",
    "UnsafeCheckpointError",
    "build_model",
    "load_pretrained",
    "read_state_dict",
    "register_backbone",
]
