"""Inject, merge, save and load adapters on any module tree by module-name pattern.

The methods come from the registry (``registry.py``; one module per method). The adapter
state lives on the model itself: wrapper modules in place of the targets, the method's
shared modules (CLoRA's ``model.clora_bank``) and the resolved method config as the plain
attribute ``model.pointclora_adapter`` (not in the state dict).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import BASE_LAYER, AdapterLayer
from .registry import Method, get_method, model_defaults

CONFIG_ATTR = "pointclora_adapter"
FORMAT = "pointclora-adapter"
FORMAT_VERSION = 1


def resolve_options(method: str, options: Mapping[str, Any],
                    model: nn.Module | None = None) -> dict[str, Any]:
    """Defaults filled in and every value checked (and, given ``model``, the options the
    model declares defaults for); raises ValueError naming what is wrong."""
    resolved = get_method(method).Options.from_dict(options)
    return (resolved.bind(model) if model is not None else resolved).to_dict()


def adapter_config(model: nn.Module) -> dict[str, Any] | None:
    """``{"method", "options", "shared"}`` of the adapter the model carries, or None."""
    cfg = getattr(model, CONFIG_ATTR, None)
    return copy.deepcopy(cfg) if cfg is not None else None


def _require_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError("the model carries no adapter; call apply_adapter(model, method) first")
    return cfg


def _matches(name: str, pattern: list[str] | str) -> bool:
    """A regex matches the full name, a list entry the name or a suffix at a ``.``."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def _owned_by(param: str, pattern: list[str] | str) -> bool:
    """The parameter, or a module that holds it, matches ``pattern``."""
    parts = param.split(".")
    return any(_matches(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _official_name(key: str) -> str:
    """State-dict key with wrapper levels removed: the key of the un-adapted model."""
    return key.replace(f".{BASE_LAYER}.", ".").removeprefix(f"{BASE_LAYER}.")


def _matching_modules(model: nn.Module, method: Method) -> list[str]:
    targets, types = method.targets(), method.target_types
    candidates = [n for n, m in model.named_modules() if isinstance(m, types) and n]
    found = [n for n in candidates if _matches(n, targets)]
    if not found:
        kinds = "/".join(("nn." if t.__module__.startswith("torch.nn") else "") + t.__name__
                         for t in types)
        raise ValueError(
            f"target_modules={targets!r} matches no {kinds} of the model; "
            f"its {kinds} layers include: {', '.join(candidates[:8]) or '(none)'}"
        )
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _inject(model: nn.Module, method: Method) -> None:
    """Build every wrapper first, so that a bad target leaves the model untouched."""
    wrappers = {}
    reference = next(iter(model.parameters()), None)
    if method.targets() is not None:
        for name in _matching_modules(model, method):
            module = model.get_submodule(name)
            reference = next(iter(module.parameters()), reference)
            wrapper = method.wrap(name, module)
            wrappers[name] = wrapper.to(reference) if reference is not None else wrapper
    for name, shared in method.shared_modules().items():
        model.add_module(name, shared.to(reference) if reference is not None else shared)
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


def _set_trainable(model: nn.Module, method: Method, created: set[int]) -> None:
    """Full fine-tuning trains everything; otherwise the parameters the injection
    ``created`` train, and those the options keep (head, tokens, ``modules_to_save``)."""
    if method.trains_backbone:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    kept = method.options.kept_trainable().values()
    for name, param in model.named_parameters():
        if id(param) in created or any(_owned_by(name, k) for k in kept):
            param.requires_grad_(True)
    if method.options.freeze_bn_stats:
        for module in model.modules():
            if isinstance(module, _BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.train = _EvalOnlyTrain(module)
                module.train(False)


def _check_kept_exist(model: nn.Module, method: Method) -> None:
    """Every name the options keep trainable matches a parameter (typos fail loudly)."""
    if method.trains_backbone:
        return
    switches = {f.name: f.metadata["needed_if"] for f in dataclasses.fields(method.options)}
    names = [n for n, _ in model.named_parameters()]
    for option_name, pattern in method.options.kept_trainable().items():
        entries = [pattern] if isinstance(pattern, str) else pattern
        for entry in entries:
            as_pattern = entry if isinstance(pattern, str) else [entry]
            if not any(_owned_by(n, as_pattern) for n in names):
                switch = switches[option_name]
                hint = f", or pass {switch}=False" if isinstance(switch, str) else ""
                raise ValueError(
                    f"{option_name}={pattern!r}: {entry!r} matches no parameter of "
                    f"{type(model).__name__}; name what it should keep trainable{hint}")


def apply_adapter(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Freeze the backbone and inject the adapter ``method`` in place; returns ``model``.

    ``options`` are the fields of the method's options class (``DEFAULT_OPTIONS[method]``;
    docs/methods.md has the table). ``None`` for ``target_modules``, ``head`` and
    ``tokens`` means what the model declares (``adapter_defaults`` on its class, or
    ``register_model_defaults``). At return the model computes exactly what it computed
    before; a failed call leaves it untouched.
    """
    spec = get_method(method)
    bound = spec.Options.from_dict(options).bind(model)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError(
            f"the model already carries a {getattr(model, CONFIG_ATTR)['method']!r} adapter; "
            "merge_adapter(model) first or start from a fresh model"
        )
    instance = spec(bound)
    shared = list(instance.shared_modules())
    taken = [name for name in shared if hasattr(model, name)]
    if taken:
        raise ValueError(f"the model already has attribute(s) {taken} that {method} registers")
    _check_kept_exist(model, instance)
    before = {id(p) for p in model.parameters()}
    _inject(model, instance)
    created = {id(p) for p in model.parameters()} - before
    _set_trainable(model, instance, created)
    setattr(model, CONFIG_ATTR, {"method": method, "options": bound.to_dict(), "shared": shared})
    return model


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the adapters' weighted regularisers (SADE for CLoRA); a zero tensor otherwise."""
    by_class: dict[type, list[AdapterLayer]] = {}
    for m in model.modules():
        if isinstance(m, AdapterLayer):
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
    return _remove_adapter(model, lambda layer: layer.merge())


def _remove_adapter(model: nn.Module, fold) -> nn.Module:
    """Every adapter layer replaced by ``fold(layer)``, then all adapter state removed; a
    layer that cannot fold (a method that cannot merge) fails before anything changed."""
    cfg = _require_config(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    merged = [(n, fold(m)) for n, m in layers]
    for name, module in merged:
        _replace(model, name, module)
    for name in cfg["shared"]:
        delattr(model, name)
    for module in model.modules():
        if _stats_frozen(module):
            del module.train
            module.train(model.training)
    model.requires_grad_(True)
    delattr(model, CONFIG_ATTR)
    return model


def _head(model: nn.Module) -> list[str] | str | None:
    """The task head's names: the adapter's ``head`` option, else the model's declared one."""
    options = getattr(model, CONFIG_ATTR, {}).get("options", {})
    head = options.get("head")
    return head if head is not None else model_defaults(model).get("head")


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``trainable`` and ``trainable_no_head`` (no head known:
    nothing is counted as head)."""
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    head = _head(model)
    return {
        "total": sum(p.numel() for _, p in named),
        "trainable": sum(p.numel() for _, p in trainable),
        "trainable_no_head": sum(p.numel() for n, p in trainable
                                 if head is None or not _owned_by(n, head)),
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
    options = resolve_options(method, payload["options"], model)
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
            _remove_adapter(model, lambda layer: layer.unwrap())  # the fresh adapter is dropped
        raise
    model.load_state_dict(stored, strict=False)
    return model


def _check_shapes(stored: Mapping[str, torch.Tensor], state: Mapping, source: str) -> None:
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(state[k].shape)}"
           for k, v in stored.items() if k in state and state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source} does not fit this model (shape mismatch): {'; '.join(bad[:5])}")
