"""Checkpoint files: RNG capture, atomic writes, and what a model contributes to them.

A checkpoint is a dict in the spirit of the official container (`base_model`, `epoch`,
`metrics`, `best_metrics`, `optimizer`) plus `config`, `method`, `scheduler`, `rng` and,
for parameter-efficient methods, `adapter` (`adapter_state_dict`). `base_model` holds only
what cannot be rebuilt from the config: trainable tensors outside the adapter, all buffers
(BatchNorm statistics move even when frozen), and the frozen weights too when the
backbone has no pretrained file to reload them from.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

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
