"""From a resolved config to datasets and an adapted model."""
from __future__ import annotations

import logging

import torch
from torch import nn

from pointclora.adapters import apply_adapter
from pointclora.data import build_dataset
from pointclora.models import build_model

logger = logging.getLogger("pointclora")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def adapter_options(cfg: dict) -> tuple[str, dict]:
    options = dict(cfg["adapter"])
    return options.pop("method"), options


def resolve_num_classes(cfg: dict, num_classes: int) -> None:
    """Fill `model.cls_dim` from the dataset when null; refuse a head of the wrong size."""
    cls_dim = cfg["model"].get("cls_dim")
    if cls_dim is None:
        cfg["model"]["cls_dim"] = num_classes
    elif cls_dim != num_classes:
        raise ValueError(
            f"model.cls_dim is {cls_dim} but the dataset {cfg['data']['name']!r} has "
            f"{num_classes} classes; set model.cls_dim={num_classes} (or null to follow the data)"
        )


def build_datasets(cfg: dict, splits=("train", "test")) -> dict:
    """{split: dataset}; also settles `model.cls_dim` in `cfg`."""
    sets = {split: build_dataset(cfg["data"], split) for split in splits}
    counts = {split: ds.num_classes for split, ds in sets.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the splits disagree on the number of classes: {counts}")
    for split, ds in sets.items():
        if len(ds) == 0:
            raise ValueError(f"the {split} split of {cfg['data']['name']!r} is empty")
    resolve_num_classes(cfg, next(iter(counts.values())))
    return sets


def build_backbone(cfg: dict) -> nn.Module:
    """The backbone with its pretrained weights (when `model.pretrained` names a file)."""
    return build_model(cfg["model"])


def build_run_model(cfg: dict) -> tuple[nn.Module, dict | None]:
    """(backbone + `adapter.method` injected and frozen as configured, initial backbone).

    The initial backbone state is kept only where a checkpoint needs it: a frozen backbone
    that no `model.pretrained` file can restore.
    """
    method, options = adapter_options(cfg)
    backbone = build_backbone(cfg)
    keep = method != "full" and not cfg["model"].get("pretrained")
    init = {k: v.detach().clone() for k, v in backbone.state_dict().items()} if keep else None
    return apply_adapter(backbone, method, **options), init


def amp_dtype(cfg: dict, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp`; CUDA only (CPU runs stay in float32)."""
    amp = cfg["train"]["amp"]
    if amp is None:
        return None
    if device.type != "cuda":
        logger.warning("train.amp=%s is ignored on %s; running in float32", amp, device)
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.amp=bf16 needs a GPU with bfloat16 support; use fp16 or null")
    return AMP_DTYPES[amp]
