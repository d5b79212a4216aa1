"""YAML run configuration: `_base_` inheritance, dotted overrides, defaults, validation.

One loader serves every tool, so a config means the same thing to `train.py`, `test.py`
and the benchmarks, and the resolved dict that a run saves reproduces that run.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "_base_"
# `derived` is written by the engine into a run's stored config (what it settled from the
# data, e.g. model.cls_dim); it is a record, recomputed whenever the data is read.
SECTIONS = ("model", "adapter", "data", "train", "output_dir", "derived")

# Official Point-MAE fine-tuning recipe (REFERENCE section 3); every run saves these resolved.
DEFAULTS: dict[str, Any] = {
    "model": {"name": "point_mae", "pretrained": None},
    "adapter": {"method": "clora"},
    "train": {
        "epochs": 300,
        "batch_size": 32,
        "lr": 5.0e-4,
        "weight_decay": 0.05,
        "warmup_epochs": 10,
        "warmup_lr": 1.0e-6,
        "min_lr": 1.0e-6,
        "grad_clip": 10.0,
        "seed": 0,
        "val_every": 1,
        "num_workers": 4,
        "amp": None,
    },
    "output_dir": None,
}
AMP_MODES = (None, "bf16", "fp16")


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[0-9][0-9_]*[eE][-+]?[0-9]+
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text_or_stream: Any) -> Any:
    """`yaml.safe_load` with `1e-3` read as a float."""
    return yaml.load(text_or_stream, Loader=_Loader)


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """`update` over `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict:
    """One file with its `_base_` files merged underneath it (bases in list order)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ValueError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        where = f" (a _base_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {path}{where}")
    with open(path) as f:
        try:
            raw = yaml_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"config {path} is not valid YAML: {err}") from err
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    bases = raw.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{BASE_KEY} in {path} must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, _read_yaml(path.parent / base, (*chain, path)))
    return deep_merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    key, sep, value = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-3)")
    try:
        parsed = yaml_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: value is not valid YAML: {err}") from err
    return keys, parsed


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Set dotted keys; intermediate sections are created where missing."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                prefix = ".".join(keys[: i + 1])
                raise ValueError(f"override {text!r}: {prefix} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return cfg


def validate(cfg: dict, source: str = "config") -> dict:
    """Reject what the engine would otherwise silently ignore."""
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"{source}: unknown top-level section(s) {unknown}; allowed: {list(SECTIONS)}"
        )
    for section in ("model", "adapter", "train"):
        if not isinstance(cfg[section], dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
    if not isinstance(cfg.get("data"), dict) or "name" not in cfg["data"]:
        raise ValueError(f"{source}: data.name is required (e.g. synthetic, modelnet40)")
    train = cfg["train"]
    unknown = sorted(set(train) - set(DEFAULTS["train"]))
    if unknown:
        raise ValueError(
            f"{source}: unknown train key(s) {unknown}; allowed: {sorted(DEFAULTS['train'])}"
        )
    if train["amp"] not in AMP_MODES:
        raise ValueError(f"{source}: train.amp must be one of {AMP_MODES}, got {train['amp']!r}")
    for key in ("epochs", "batch_size", "val_every"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ValueError(
                f"{source}: train.{key} must be a positive integer, got {train[key]!r}"
            )
    if not isinstance(train["warmup_epochs"], int) or train["warmup_epochs"] < 0:
        raise ValueError(f"{source}: train.warmup_epochs must be an integer >= 0, "
                         f"got {train['warmup_epochs']!r}")
    return cfg


def add_override_argument(parser) -> None:
    """The one ``--set KEY=VALUE`` option every tool shares (repeatable, several per flag)."""
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+",
                        default=[], help="override a config value, e.g. train.lr=1e-3 "
                        "(dotted key, YAML value; repeatable)")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Resolved run config: defaults < `_base_` files < the file < `overrides`."""
    cfg = deep_merge(DEFAULTS, _read_yaml(Path(path), ()))
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg, source=str(path))


def dump_config(cfg: Mapping, path: str | Path) -> None:
    """Write a resolved config that `load_config` reads back to the same dict."""
    with open(path, "w") as f:
        yaml.safe_dump(dict(cfg), f, sort_keys=False, default_flow_style=False)
