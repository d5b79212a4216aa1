"""From a config to datasets and an adapted model.

Nothing here writes into the user's config: what the data settles (the number of classes)
comes back as a `derived` section (`resolve_config`), which the run records beside the
user's keys and which `build_backbone` merges in.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from pointclora.adapters import apply_adapter
from pointclora.data import build_dataset
from pointclora.models import build_model
from pointclora.models.vit import normalization_warning

from .tasks import build_task

logger = logging.getLogger("pointclora")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DERIVED = "derived"  # config section: what the engine settled from the data, for the record
# (section, key) of the config values that are paths; "" is the top level.
PATH_KEYS = (("data", "root"), ("data", "cache_dir"), ("model", "pretrained"),
             ("", "output_dir"))


def adapter_options(cfg: dict) -> tuple[str, dict]:
    options = dict(cfg["adapter"])
    return options.pop("method"), options


def build_datasets(cfg: dict, splits=("train", "test")) -> dict:
    """{split: dataset}; `cfg` is only read (`resolve_config` records what the data settles)."""
    sets = {split: build_dataset(cfg["data"], split) for split in splits}
    counts = {split: getattr(ds, "num_classes", None) for split, ds in sets.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the splits disagree on the number of classes: {counts}")
    for split, ds in sets.items():
        if len(ds) == 0:
            raise ValueError(f"the {split} split of {cfg['data']['name']!r} is empty")
    return sets


def resolve_config(cfg: dict, datasets: dict) -> dict:
    """A copy of `cfg` whose `derived` section holds what the task settles from the data
    (e.g. `model.cls_dim` left null); the user's own keys stay as written."""
    out = copy.deepcopy(cfg)
    out[DERIVED] = build_task(cfg).derive(datasets)
    return out


def model_config(cfg: dict) -> dict:
    """The `model` section the backbone is built from: the user's keys + the derived ones."""
    return {**cfg["model"], **(cfg.get(DERIVED) or {}).get("model", {})}


def absolute_paths(cfg: dict) -> dict:
    """A copy with the file paths of `cfg` (data root and cache, pretrained weights, output
    folder) made absolute against the current folder, so a stored config works from anywhere."""
    out = copy.deepcopy(cfg)
    for section, key in PATH_KEYS:
        node = out.get(section) if section else out
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value:
            node[key] = str(Path(value).expanduser().absolute())
    return out


def run_warnings(cfg: dict) -> list[str]:
    """What a user must know before reading this run's numbers."""
    method = cfg["adapter"]["method"]
    found = [normalization_warning(cfg)]  # image weights fed inputs they were not trained on
    if method != "full" and not cfg["model"].get("pretrained"):
        found.append(f"model.pretrained is null: adapter.method={method} trains on a FROZEN, "
                     "RANDOMLY INITIALISED backbone. Expect "
                     f"{build_task(cfg).random_backbone_outcome()}; set model.pretrained to "
                     "the official pre-training file, or use adapter.method=full")
    return [w for w in found if w]


def build_backbone(cfg: dict, trust_pickle: bool = False) -> nn.Module:
    """The backbone with its pretrained weights (when `model.pretrained` names a file).

    `trust_pickle` comes from the caller (a `--trust-pickle` flag), never from `cfg`: a
    stored config must not be able to switch on unpickling of arbitrary objects.
    """
    return build_model(model_config(cfg), trust_pickle=trust_pickle)


def build_run_model(cfg: dict, trust_pickle: bool = False) -> tuple[nn.Module, dict | None]:
    """(backbone + `adapter.method` injected and frozen as configured, initial backbone).

    The initial backbone state is kept only where a checkpoint needs it: a frozen backbone
    that no `model.pretrained` file can restore.
    """
    method, options = adapter_options(cfg)
    backbone = build_backbone(cfg, trust_pickle)
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
