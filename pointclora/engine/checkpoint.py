"""Checkpoint files: RNG capture, atomic writes, and what a model contributes to them.

A checkpoint is a dict in the spirit of the official container (`base_model`, `epoch`,
`metrics`, `best_metrics`, `optimizer`) plus `config`, `scheduler`, `rng` and `adapter`.
- `full`: `base_model` is the whole state dict under the official keys, so the file also
  loads as `model.pretrained` elsewhere.
- every other method: `adapter` is `adapter_state_dict(model)` (what training changed,
  checked against the frozen backbone's fingerprint on load). The frozen backbone is
  reloaded from `model.pretrained`; when there is none it was randomly initialised, and
  `base_model` then keeps that initial backbone so the run can be rebuilt.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pointclora.adapters import adapter_state_dict, apply_adapter, load_adapter

from .build import adapter_options, build_backbone

FORMAT_VERSION = 1


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states, as plain tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Write through a temporary file so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        raise ValueError(f"{path} is not a readable PointCLoRA checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise ValueError(
            f"{path} is not a PointCLoRA training checkpoint (no format_version); "
            "pretrained backbone files belong in model.pretrained"
        )
    return ckpt


def model_payload(model: nn.Module, cfg: dict, init_backbone: dict | None) -> dict:
    """The model part of a checkpoint; `init_backbone` is the backbone's state at build time."""
    if cfg["adapter"]["method"] == "full":
        return {"base_model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload = {"adapter": adapter_state_dict(model)}
    if not cfg["model"].get("pretrained"):
        payload["base_model"] = init_backbone
    return payload


def restore_model(cfg: dict, ckpt: dict) -> tuple[nn.Module, dict | None]:
    """(model rebuilt from `cfg` with the checkpoint's weights, its initial backbone or None)."""
    method = cfg["adapter"]["method"]
    if ckpt.get("method", method) != method:
        raise ValueError(
            f"the checkpoint was trained with adapter.method={ckpt['method']!r}, the config "
            f"says {method!r}; use the run's config.yaml"
        )
    model = build_backbone(cfg)
    base = ckpt.get("base_model")
    if base is not None:
        missing, unexpected = model.load_state_dict(base, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not fit the model of this config: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}; use the run's config.yaml"
            )
    elif method == "full" or not cfg["model"].get("pretrained"):
        raise ValueError("the checkpoint holds no backbone weights and the config names no "
                         "model.pretrained file to rebuild them from")
    if method == "full":
        return apply_adapter(model, method, **adapter_options(cfg)[1]), None
    return load_adapter(model, ckpt["adapter"]), base
