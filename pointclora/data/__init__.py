"""Datasets (ModelNet40, its few-shot folds, ScanObjectNN, synthetic shapes) and the
batched sampling/augmentation transforms of the official fine-tuning recipes."""
from .build import DATASETS, build_dataset
from .common import DataError, PointClouds, normalize_unit_sphere
from .modelnet40 import MODELNET40_CLASSES
from .scanobjectnn import SCANOBJECTNN_CLASSES
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import SyntheticShapes
from .transforms import BatchTransform, build_batch_transform, protocol_description

__all__ = [
    "DATASETS", "MODELNET40_CLASSES", "SCANOBJECTNN_CLASSES", "SYNTHETIC_CLASSES",
    "BatchTransform", "DataError", "PointClouds", "SyntheticShapes", "build_batch_transform",
    "build_dataset", "normalize_unit_sphere", "protocol_description",
]
