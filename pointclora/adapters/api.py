"""Inject, merge, save and load adapters on any module tree by module-name pattern.

The adapter state lives on the model itself: wrapper modules in place of the targeted
``nn.Linear`` layers, CLoRA's shared bank as ``model.clora_bank``, and the resolved
method config as the plain attribute ``model.pointclora_adapter`` (not in the state dict).
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pointclora.models import HEAD_PREFIX

from . import aoft, clora
from .aoft import AOFTLinear
from .base import BASE_LAYER, LowRankLinear
from .clora import CLoRABank, CLoRALinear
from .lora import LoRALinear
from .serial_lora import SerialLoRALinear

METHODS = ("full", "linear", "lora", "clora", "serial_lora", "aoft")
TOKEN_NAMES = ("cls_token", "cls_pos")
CONFIG_ATTR = "pointclora_adapter"
BANK_ATTR = "clora_bank"
FORMAT = "pointclora-adapter"
FORMAT_VERSION = 1

_FROZEN_BACKBONE = {"train_head": True, "train_tokens": True, "freeze_bn_stats": True}
_LOW_RANK = {"target_modules": ["attn.qkv", "attn.proj"], "split_qkv": True, "r": 8}
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "linear": {"train_tokens": False, "freeze_bn_stats": True},
    "lora": {**_FROZEN_BACKBONE, **_LOW_RANK, "alpha": 16.0},
    "clora": {
        **_FROZEN_BACKBONE,
        **_LOW_RANK,
        "p": 4,
        "init": "orthonormal",
        "sade_weight": 1e-3,
        "sade_similarity": "cross_gram",
        "sade_eps": 1e-8,
    },
    "serial_lora": {**_FROZEN_BACKBONE, "target_modules": ["attn.qkv"], "r": 8, "alpha": 16.0},
    "aoft": {**_FROZEN_BACKBONE, **_LOW_RANK, "init": "unit"},
}
_CHOICES = {
    ("clora", "init"): clora.INITS,
    ("clora", "sade_similarity"): clora.SIMILARITIES,
    ("aoft", "init"): aoft.INITS,
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_VALUE_CHECKS = {
    "train_head": (lambda v: isinstance(v, bool), "a bool"),
    "train_tokens": (lambda v: isinstance(v, bool), "a bool"),
    "freeze_bn_stats": (lambda v: isinstance(v, bool), "a bool"),
    "split_qkv": (lambda v: isinstance(v, bool), "a bool"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "p": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "sade_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (YAML: write 1.0e-3)"),
    "sade_eps": (lambda v: _is_number(v) and v > 0, "a number > 0 (YAML: write 1.0e-8)"),
    "target_modules": (
        lambda v: isinstance(v, str)
        or (isinstance(v, (list, tuple)) and v and all(isinstance(t, str) for t in v)),
        "a regex string or a non-empty list of module-name suffixes",
    ),
}


def resolve_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; raises ValueError naming what is wrong."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; valid methods: {', '.join(METHODS)}")
    defaults = DEFAULT_OPTIONS[method]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "(none)"
        raise ValueError(
            f"unknown option(s) {unknown} for adapter method {method!r}; valid: {valid}"
        )
    resolved = {**copy.deepcopy(defaults), **options}
    for name, value in resolved.items():
        choices = _CHOICES.get((method, name))
        if choices is not None:
            if value not in choices:
                raise ValueError(f"{method} option {name}={value!r}; valid: {', '.join(choices)}")
            continue
        check, expected = _VALUE_CHECKS[name]
        if not check(value):
            raise ValueError(f"{method} option {name} must be {expected}, got {value!r}")
    if isinstance(resolved.get("target_modules"), tuple):
        resolved["target_modules"] = list(resolved["target_modules"])
    return resolved


def adapter_config(model: nn.Module) -> dict[str, Any] | None:
    """``{"method", "options"}`` of the adapter the model carries, or None."""
    cfg = getattr(model, CONFIG_ATTR, None)
    return copy.deepcopy(cfg) if cfg is not None else None


def _require_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError("the model carries no adapter; call apply_adapter(model, method) first")
    return cfg


def _in_head(name: str) -> bool:
    return name == HEAD_PREFIX or name.startswith(HEAD_PREFIX + ".")


def _official_name(key: str) -> str:
    """State-dict key with wrapper levels removed: the key of the un-adapted model."""
    return key.replace(f".{BASE_LAYER}.", ".").removeprefix(f"{BASE_LAYER}.")


def _matching_linears(model: nn.Module, targets: str | list[str]) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if isinstance(targets, str):
        found = [n for n in linears if re.fullmatch(targets, n)]
    else:
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(
            f"target_modules={targets!r} matches no nn.Linear of the model; "
            f"its linear layers include: {', '.join(linears[:8]) or '(none)'}"
        )
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _wrapper_factory(method: str, o: dict[str, Any], bank: CLoRABank | None):
    if method == "lora":
        return lambda lin, n: LoRALinear(lin, o["r"], o["alpha"], n)
    if method == "serial_lora":
        return lambda lin, n: SerialLoRALinear(lin, o["r"], o["alpha"])
    if method == "aoft":
        return lambda lin, n: AOFTLinear(lin, o["r"], n, init=o["init"])
    return lambda lin, n: CLoRALinear(
        lin, bank, n, o["sade_weight"], o["sade_similarity"], o["sade_eps"]
    )


def _inject(model: nn.Module, method: str, o: dict[str, Any]) -> None:
    """Build every wrapper first, so that a bad target leaves the model untouched."""
    names = _matching_linears(model, o["target_modules"])
    bank = CLoRABank(o["p"], o["r"], init=o["init"]) if method == "clora" else None
    build = _wrapper_factory(method, o, bank)
    wrappers = {}
    for name in names:
        linear = model.get_submodule(name)
        n_slices = 3 if o.get("split_qkv") and name.rpartition(".")[2] == "qkv" else 1
        wrappers[name] = build(linear, n_slices).to(linear.weight)
    if bank is not None:
        model.add_module(BANK_ATTR, bank.to(linear.weight))
    for name, wrapper in wrappers.items():
        _replace(model, name, wrapper)


class _EvalOnlyTrain:
    """``train()`` of a BatchNorm whose running statistics are frozen: always eval mode.

    A picklable callable set on the instance (a bound function would not survive pickling).
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def _stats_frozen(module: nn.Module) -> bool:
    return isinstance(vars(module).get("train"), _EvalOnlyTrain)


def _set_trainable(model: nn.Module, method: str, o: dict[str, Any]) -> None:
    if method == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            for name, param in module.named_parameters():
                param.requires_grad_(not name.startswith(BASE_LAYER + "."))
        elif isinstance(module, CLoRABank):
            module.requires_grad_(True)
    params = dict(model.named_parameters())
    if o.get("train_head", True):
        for name, param in params.items():
            if _in_head(name):
                param.requires_grad_(True)
    if o["train_tokens"]:
        for name in TOKEN_NAMES:
            params[name].requires_grad_(True)
    if o["freeze_bn_stats"]:
        for module in model.modules():
            if isinstance(module, _BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.train = _EvalOnlyTrain(module)
                module.train(False)


def _check_trainable_exist(model: nn.Module, method: str, o: dict[str, Any]) -> None:
    names = {n for n, _ in model.named_parameters()}
    if method != "full" and o.get("train_head", True) and not any(map(_in_head, names)):
        hint = "" if method == "linear" else "; pass train_head=False for a model without it"
        raise ValueError(f"the model has no parameters under {HEAD_PREFIX!r}{hint}")
    missing = [t for t in TOKEN_NAMES if t not in names]
    if o.get("train_tokens") and missing:
        raise ValueError(
            f"the model has no parameter(s) {missing}; pass train_tokens=False for such a model"
        )


def apply_adapter(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Freeze the backbone and inject the adapter ``method`` in place; returns ``model``.

    Options (defaults in ``DEFAULT_OPTIONS``; docs/methods.md has the full table):

    - ``train_head`` (True), ``train_tokens`` (True; False for ``linear``): keep the
      ``cls_head_finetune`` head and ``cls_token``/``cls_pos`` trainable.
    - ``freeze_bn_stats`` (True): BatchNorm layers with no trainable parameter stay in
      eval mode, so their running statistics keep the pre-trained values.
    - ``target_modules`` (``["attn.qkv", "attn.proj"]``; ``["attn.qkv"]`` for
      ``serial_lora``): module-name suffixes, or one regex matched against full names.
    - ``split_qkv`` (True): a target called ``qkv`` (last name part) gets separate q, k, v modules.
    - ``r`` (8) rank; ``alpha`` (16) LoRA scale numerator, ``s = alpha / r``.
    - CLoRA: ``p`` (4) shared spaces, ``init`` (``orthonormal`` | ``normal``) of the
      spaces, ``sade_weight`` (1e-3), ``sade_similarity`` (``cross_gram`` | ``cosine``),
      ``sade_eps`` (1e-8).
    - AOFT: ``init`` (``unit`` | ``identity``) of the generating vectors.

    At return the model computes exactly what it computed before.
    """
    o = resolve_options(method, options)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError(
            f"the model already carries a {getattr(model, CONFIG_ATTR)['method']!r} adapter; "
            "merge_adapter(model) first or start from a fresh model"
        )
    if method == "clora" and hasattr(model, BANK_ATTR):
        raise ValueError(f"the model already has an attribute {BANK_ATTR!r}")
    _check_trainable_exist(model, method, o)
    if method in ("lora", "clora", "serial_lora", "aoft"):
        _inject(model, method, o)
    _set_trainable(model, method, o)
    setattr(model, CONFIG_ATTR, {"method": method, "options": o})
    return model


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the adapters' weighted regularisers (SADE for CLoRA); a zero tensor otherwise."""
    by_class: dict[type, list[LowRankLinear]] = {}
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            by_class.setdefault(type(m), []).append(m)
    terms = [t for cls, modules in by_class.items()
             if (t := cls.total_regularization(modules)) is not None]
    if not terms:
        return torch.zeros((), device=_device(model))
    return torch.stack(terms).sum()


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter into its frozen layer and remove all adapter state, in place.

    The result is a plain backbone: the official state-dict keys, every parameter
    trainable again, every BatchNorm following ``train()``/``eval()`` as usual.
    """
    _require_config(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            _replace(model, name, module.merge())
    if isinstance(getattr(model, BANK_ATTR, None), CLoRABank):
        delattr(model, BANK_ATTR)
    for module in model.modules():
        if _stats_frozen(module):
            del module.train
            module.train(model.training)
    model.requires_grad_(True)
    delattr(model, CONFIG_ATTR)
    return model


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``trainable`` and ``trainable_no_head``."""
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    return {
        "total": sum(p.numel() for _, p in named),
        "trainable": sum(p.numel() for _, p in trainable),
        "trainable_no_head": sum(p.numel() for n, p in trainable if not _in_head(n)),
    }


def trained_keys(model: nn.Module) -> list[str]:
    """State-dict keys that training changes: trainable parameters and live BN statistics."""
    live = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not _stats_frozen(module):
            buffers = (b for b, _ in module.named_buffers(recurse=False))
            live.update(f"{name}.{b}" if name else b for b in buffers)
    return [k for k in model.state_dict() if k in live]


def backbone_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """sha256 over names, shapes, dtypes and bytes of every state entry not in ``exclude``.

    Names are taken without wrapper levels, so an adapted model and the bare backbone
    give the same fingerprint.
    """
    skip = {_official_name(k) for k in exclude}
    entries = {_official_name(k): v for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for name in sorted(set(entries) - skip):
        tensor = entries[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


def adapter_state_dict(model: nn.Module) -> dict[str, Any]:
    """What training changed, plus the method config and the frozen backbone's fingerprint."""
    cfg = _require_config(model)
    keys = trained_keys(model)
    state = model.state_dict()
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": cfg["method"],
        "options": copy.deepcopy(cfg["options"]),
        "fingerprint": backbone_fingerprint(model, keys),
        "state_dict": {k: state[k].detach().to("cpu").clone() for k in keys},
    }


def _read_payload(path_or_dict: str | os.PathLike | Mapping) -> tuple[Mapping, str]:
    if isinstance(path_or_dict, Mapping):
        payload, source = path_or_dict, "the adapter dict"
    else:
        path = Path(path_or_dict)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and unpickler errors alike
            raise ValueError(f"{path} is not a readable adapter file: {err}") from err
    required = ("format", "method", "options", "fingerprint", "state_dict")
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT or any(
        k not in payload for k in required
    ):
        raise ValueError(
            f"{source} is not a PointCLoRA adapter (expected a dict with format={FORMAT!r} "
            f"and keys {list(required)}, as written by adapter_state_dict)"
        )
    return payload, source


def load_adapter(model: nn.Module, path_or_dict: str | os.PathLike | Mapping) -> nn.Module:
    """Load a saved adapter; applies its method first when the model carries none.

    Refuses (ValueError, model unchanged) a backbone whose frozen weights differ from the
    ones the adapter was trained on, and a model carrying a different adapter.
    """
    payload, source = _read_payload(path_or_dict)
    method = payload["method"]
    options = resolve_options(method, payload["options"])
    stored = dict(payload["state_dict"])
    current = getattr(model, CONFIG_ATTR, None)
    if current is not None and (current["method"], current["options"]) != (method, options):
        raise ValueError(
            f"{source} holds a {method!r} adapter with options {options}, but the model "
            f"carries {current['method']!r} with {current['options']}; load onto a model "
            "without adapter (the stored method is applied) or one adapted the same way"
        )
    fingerprint = backbone_fingerprint(model, stored)
    if fingerprint != payload["fingerprint"]:
        raise ValueError(
            f"{source} was trained on a different backbone: frozen-weight fingerprint "
            f"{payload['fingerprint'][:16]}... expected, this model has {fingerprint[:16]}...; "
            "load the same pre-trained checkpoint the adapter was trained from"
        )
    state = model.state_dict()
    _check_shapes(stored, state, source)
    if current is None:
        apply_adapter(model, method, **options)
    try:
        state = model.state_dict()
        expected = set(trained_keys(model))
        missing, unexpected = sorted(expected - set(stored)), sorted(set(stored) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        _check_shapes(stored, state, source)
    except ValueError:
        if current is None:
            merge_adapter(model)  # the fresh adapter is the identity: this restores the model
        raise
    model.load_state_dict(stored, strict=False)
    return model


def _check_shapes(stored: Mapping[str, torch.Tensor], state: Mapping, source: str) -> None:
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(state[k].shape)}"
           for k, v in stored.items() if k in state and state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source} does not fit this model (shape mismatch): {'; '.join(bad[:5])}")
