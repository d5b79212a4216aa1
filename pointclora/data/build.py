"""`build_dataset`: one entry point from the `data:` config section to a dataset."""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from .common import DataError
from .fewshot import build_fewshot
from .fgvc import FGVC_KEYS, build_fgvc
from .images import (
    SYNTHETIC_IMAGE_KEYS,
    TRANSFORM_KEYS,
    build_image_folder,
    build_synthetic_images,
)
from .modelnet40 import build_modelnet40
from .scanobjectnn import build_scanobjectnn
from .shapenetpart import SHAPENETPART_KEYS, build_shapenetpart
from .synthetic import SYNTHETIC_KEYS, build_synthetic
from .synthetic_parts import SYNTHETIC_PARTS_KEYS, build_synthetic_parts
from .vtab import VTAB_KEYS, build_vtab1k

DATASETS: dict[str, Callable[[dict, str], Dataset]] = {
    "synthetic": build_synthetic,
    "modelnet40": build_modelnet40,
    "modelnet40_fewshot": build_fewshot,
    "scanobjectnn": build_scanobjectnn,
    "vtab1k": build_vtab1k,
    "fgvc": build_fgvc,
    "image_folder": build_image_folder,
    "synthetic_images": build_synthetic_images,
    "shapenetpart": build_shapenetpart,
    "synthetic_parts": build_synthetic_parts,
}
# Keys each dataset reads (besides the transform keys npoints, protocol, up_axis).
KEYS = {
    "synthetic": set(SYNTHETIC_KEYS),
    "modelnet40": {"root", "format", "num_category", "raw_points", "cache_dir", "shape_names",
                   "h5_files"},
    "modelnet40_fewshot": {"root", "way", "shot", "fold", "shape_names"},
    "scanobjectnn": {"root", "variant"},
    # images (docs/images.md): the transform keys and each loader's own
    "vtab1k": {*VTAB_KEYS, *TRANSFORM_KEYS},
    "fgvc": {*FGVC_KEYS, *TRANSFORM_KEYS},
    "image_folder": {"root", "train_split", "test_split", *TRANSFORM_KEYS},
    "synthetic_images": {*SYNTHETIC_IMAGE_KEYS, *TRANSFORM_KEYS},
    # part segmentation (docs/segmentation.md)
    "shapenetpart": set(SHAPENETPART_KEYS),
    "synthetic_parts": set(SYNTHETIC_PARTS_KEYS),
}
COMMON_KEYS = {"name", "npoints", "protocol", "up_axis"}


def build_dataset(cfg_data: dict, split: str) -> Dataset:
    """Dataset `cfg_data["name"]` for `split` (train | test); items (points (N, 3), int)."""
    name = cfg_data.get("name", "synthetic")
    if name not in DATASETS:
        raise DataError(f"data.name must be one of {sorted(DATASETS)}; got {name!r}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test'; got {split!r}")
    unknown = sorted(set(cfg_data) - COMMON_KEYS - KEYS[name])
    if unknown:  # an error, as for model and adapter keys: a typo must not go unnoticed
        raise DataError(f"unknown data key(s) {[f'data.{k}' for k in unknown]} for dataset "
                        f"{name!r}; valid keys: {sorted(KEYS[name] | COMMON_KEYS)}")
    return DATASETS[name](cfg_data, split)
