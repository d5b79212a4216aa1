"""Classify a user's point clouds with a trained checkpoint, as its test split was seen.

Each cloud gets the normalisation of the run's dataset loader (unit sphere for ModelNet40
and the synthetic shapes, none for ScanObjectNN, whose clouds are used as stored) and the
test sampling of `data.npoints` (FPS; nothing when the cloud has exactly that many points).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pointclora.data import (
    MODELNET40_CLASSES,
    SCANOBJECTNN_CLASSES,
    SYNTHETIC_CLASSES,
    DataError,
    build_batch_transform,
    build_dataset,
    normalize_unit_sphere,
)

# What each dataset loader does to a cloud before the batch transform.
UNIT_SPHERE = {"modelnet40": True, "modelnet40_fewshot": True, "synthetic": True,
               "scanobjectnn": False}


def checkpoint_class_names(ckpt: dict, cfg: dict, num_classes: int) -> list[str]:
    """The class names stored in the checkpoint; for older checkpoints, those of its data
    config (the published lists, else the dataset's own files), else `class_<i>`."""
    names = ckpt.get("class_names")
    if not names:
        data = cfg["data"]
        name = data.get("name")
        if name == "synthetic":
            names = SYNTHETIC_CLASSES[:int(data.get("num_classes", 8))]
        elif name == "scanobjectnn":
            names = SCANOBJECTNN_CLASSES
        elif name == "modelnet40" and not data.get("shape_names") and num_classes == 40:
            names = MODELNET40_CLASSES
        else:
            try:
                names = build_dataset(data, "test").class_names
            except (DataError, OSError, ValueError):
                names = None
    names = list(names or [])
    if len(names) != num_classes:
        warnings.warn(f"no class names for the model's {num_classes} outputs (found "
                      f"{len(names)}); printing class_<index>", RuntimeWarning, stacklevel=2)
        names = [f"class_{i}" for i in range(num_classes)]
    return names


def prepare_cloud(points: np.ndarray, cfg_data: dict, source: str = "cloud",
                  normalize: bool | None = None) -> torch.Tensor:
    """(N, 3) -> (npoints, 3) as the model saw its test clouds; `normalize` None: as the
    run's dataset loader did (`UNIT_SPHERE`)."""
    xyz = torch.as_tensor(np.asarray(points, dtype=np.float32))[None]
    npoints = int(cfg_data.get("npoints", 1024))
    if xyz.shape[1] < npoints:
        raise DataError(f"{source}: {xyz.shape[1]} points, fewer than the {npoints} the model "
                        "was trained on (data.npoints)")
    if normalize is None:
        normalize = UNIT_SPHERE.get(cfg_data.get("name"), True)
    if normalize:
        xyz = normalize_unit_sphere(xyz)
    return build_batch_transform(cfg_data, "test")(xyz)[0]


@torch.no_grad()
def classify(model: nn.Module, clouds: Sequence[torch.Tensor], device: torch.device,
             batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (F, C) of prepared clouds (`prepare_cloud`)."""
    model.eval()
    probs = []
    for start in range(0, len(clouds), batch_size):
        batch = torch.stack(list(clouds[start:start + batch_size])).to(device)
        probs.append(model(batch).float().softmax(-1).cpu())
    return torch.cat(probs)


def top_k(probs: torch.Tensor, class_names: Sequence[str], k: int) -> list[list[tuple]]:
    """Per row, the `k` most probable (class name, probability), most probable first."""
    values, index = probs.topk(min(k, probs.shape[1]), dim=-1)
    return [[(class_names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist(), strict=True)]
            for vs, ix in zip(values, index, strict=True)]
