"""ScanObjectNN (HKUST) h5 files, read as the official fine-tuning code reads them.

Points are used as stored (no normalisation); the h5 `mask` (background points) is not
needed for classification and is not loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import DataError, PointClouds, as_labels, missing, read_h5

SCANOBJECTNN_CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
    "bed", "pillow", "sink", "sofa", "toilet",
)

# variant -> (folder, file suffix) of the official release.
VARIANTS = {
    "obj_bg": ("main_split", ""),
    "obj_only": ("main_split_nobg", ""),
    "pb_t50_rs": ("main_split", "_augmentedrot_scale75"),
}

LAYOUT = """\
  ROOT/                          (data.root, e.g. datasets/ScanObjectNN; or its h5_files/)
    main_split/training_objectdataset.h5, test_objectdataset.h5            OBJ_BG
    main_split/training_objectdataset_augmentedrot_scale75.h5, test_...    PB_T50_RS
    main_split_nobg/training_objectdataset.h5, test_objectdataset.h5       OBJ_ONLY
  h5 keys: data (n, 2048, 3) float32, label (n,), mask (n, 2048)
"""


def h5_path(root: Path, variant: str, split: str) -> Path:
    """Official file of `variant`/`split` under `root` (or under `root/h5_files`)."""
    if variant not in VARIANTS:
        raise DataError(f"data.variant must be one of {sorted(VARIANTS)}; got {variant!r}")
    folder, suffix = VARIANTS[variant]
    name = f"{'training' if split == 'train' else 'test'}_objectdataset{suffix}.h5"
    for base in (root, root / "h5_files"):
        if (base / folder / name).is_file():
            return base / folder / name
    return root / folder / name


def build_scanobjectnn(cfg: dict, split: str) -> PointClouds:
    root = Path(cfg.get("root", "datasets/ScanObjectNN")).expanduser()
    if not root.is_dir():
        raise missing("ScanObjectNN root (data.root)", root, LAYOUT)
    path = h5_path(root, str(cfg.get("variant", "pb_t50_rs")).lower(), split)
    arrays = read_h5(path, ("data", "label"), LAYOUT)
    data = arrays["data"]
    if data.ndim != 3 or data.shape[-1] != 3:
        raise DataError(f"{path}: 'data' has shape {data.shape}; expected (n, points, 3), so "
                        "sample 0 already has the wrong point dimensions")
    if len(arrays["label"]) != len(data):
        raise DataError(f"{path}: {len(data)} clouds but {len(arrays['label'])} labels")
    points = torch.from_numpy(data.astype(np.float32))
    return PointClouds(points, as_labels(arrays["label"], str(path)), SCANOBJECTNN_CLASSES,
                       str(path))
