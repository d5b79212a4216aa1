"""Point-MAE and Point-BERT backbones with the official state-dict layout, and their loader."""
from .backbones import PointBERT, PointMAE, PointTransformer
from .builder import BACKBONES, build_model
from .checkpoint import (
    HEAD_PREFIX,
    CheckpointError,
    CheckpointNotFoundError,
    LoadReport,
    UnsafeCheckpointError,
    read_state_dict,
)

__all__ = [
    "BACKBONES",
    "HEAD_PREFIX",
    "CheckpointError",
    "CheckpointNotFoundError",
    "LoadReport",
    "PointBERT",
    "PointMAE",
    "PointTransformer",
    "UnsafeCheckpointError",
    "build_model",
    "read_state_dict",
]
