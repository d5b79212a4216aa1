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
from typing import Any

import numpy as np
import torch
from torch import nn

from pointclora.adapters import adapter_state_dict, apply_adapter, load_adapter, resolve_options

from .build import adapter_options, build_backbone, model_config
from .rundir import TMP_SUFFIX

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


REQUIRED_KEYS = ("config", "epoch")


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Write through a temporary file so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, read without unpickling anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint (an interrupted copy?)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, legacy pickle
        raise ValueError(f"{path} is not a PyTorch checkpoint file (it starts with {head!r}); "
                         "give a checkpoints/best.pth or last.pth written by tools/train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unpickler error" in ln or "GLOBAL" in ln),
                   lines[0] if lines else "")
        raise ValueError(
            f"{path} is not a readable PointCLoRA checkpoint ({type(err).__name__}: "
            f"{why[:200]}); give a checkpoints/best.pth or last.pth written by tools/train.py"
        ) from err
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise ValueError(
            f"{path} is not a PointCLoRA training checkpoint (no format_version); "
            "pretrained backbone files belong in model.pretrained"
        )
    absent = [k for k in REQUIRED_KEYS if k not in ckpt]
    if absent or not isinstance(ckpt["config"], dict):
        raise ValueError(f"{path} is an incomplete PointCLoRA checkpoint: no "
                         f"{absent or ['config']} entry; give a checkpoint written by "
                         "tools/train.py")
    return ckpt


# Restored with the optimiser and scheduler state, so a new value would never run.
FIXED_ON_RESUME = ("train.lr", "train.weight_decay", "train.warmup_epochs", "train.warmup_lr",
                   "train.min_lr")


def _diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def resume_changes(ckpt: dict, cfg: dict, epoch: int) -> list[dict]:
    """The run's config history: the checkpoint's, plus what `cfg` changes from `epoch` on.

    Each entry is `{"epoch", "key", "old", "new"}`: the new value holds from that epoch on
    (`log.csv` shows the lr each epoch really ran at). Changes that the restored optimiser
    and scheduler state would silently undo (`FIXED_ON_RESUME`) are refused.
    """
    diff = _diff(ckpt["config"], cfg)
    fixed = [f"{k}: {a!r} -> {b!r}" for k, a, b in diff if k in FIXED_ON_RESUME]
    if fixed:
        raise ValueError(
            f"cannot resume with {'; '.join(fixed)}: the optimiser and lr schedule resume "
            "from their saved state, so the new value would never run. Resume with the run's "
            "config.yaml, or start a new run (--out NEW_DIR) to train with it"
        )
    return list(ckpt.get("changes", [])) + [
        {"epoch": epoch, "key": k, "old": a, "new": b} for k, a, b in diff]


def model_payload(model: nn.Module, cfg: dict, init_backbone: dict | None) -> dict:
    """The model part of a checkpoint; `init_backbone` is the backbone's state at build time."""
    if cfg["adapter"]["method"] == "full":
        return {"base_model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload = {"adapter": adapter_state_dict(model)}
    if not cfg["model"].get("pretrained"):
        payload["base_model"] = init_backbone
    return payload


def _check_same_model(cfg: dict, ckpt: dict, model: nn.Module) -> None:
    """Refuse a config whose model or adapter differs from the trained one (no silent pick).

    `model` is the backbone built from `cfg`: adapter options it declares defaults for are
    resolved against it, as they were at training time.
    """
    method = cfg["adapter"]["method"]
    saved, current = model_config(ckpt["config"]), model_config(cfg)
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}"
            for k, v in current.items()
            if k not in ("pretrained", "drop_path_rate") and saved.get(k) != v]
    if "adapter" in ckpt:
        trained = ckpt["adapter"]["options"]
        asked = resolve_options(method, adapter_options(cfg)[1], model)
        diff += [f"adapter.{k}: checkpoint {trained.get(k)!r}, config {asked.get(k)!r}"
                 for k in sorted(set(trained) | set(asked)) if trained.get(k) != asked.get(k)]
    if diff:
        hint = (" (model.cls_dim follows the data: the config's data set has another number of "
                "classes)" if any(d.startswith("model.cls_dim") for d in diff) else "")
        raise ValueError(f"the config does not describe the trained model: {'; '.join(diff)}"
                         f"{hint}. A trained model's shape and adapter options cannot change; "
                         "drop those --set values or use the run's config.yaml")


def restore_model(cfg: dict, ckpt: dict, trust_pickle: bool = False
                  ) -> tuple[nn.Module, dict | None]:
    """(model rebuilt from `cfg` with the checkpoint's weights, its initial backbone or None).

    `trust_pickle` applies to the `model.pretrained` file only (see `build_backbone`).
    """
    method = cfg["adapter"]["method"]
    if ckpt.get("method", method) != method:
        raise ValueError(
            f"the checkpoint was trained with adapter.method={ckpt['method']!r}, the config "
            f"says {method!r}; use the run's config.yaml"
        )
    model = build_backbone(cfg, trust_pickle)
    _check_same_model(cfg, ckpt, model)
    base = ckpt.get("base_model")
    if base is not None:
        try:
            missing, unexpected = model.load_state_dict(base, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"checkpoint weights do not fit the model of this config: {err}; "
                             "use the run's config.yaml") from None
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
