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
        # The official part-segmentation loop steps the optimizer twice per batch on the same
        # gradients (before and after clipping); docs/segmentation.md.
        "double_step": False,
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


# Value kinds of the train and data keys: (kind, minimum, null allowed). Kinds: "int" (a
# YAML integer, not a bool), "number" (int or float), "str", "list", "dict", "bool".
TRAIN_TYPES: dict[str, tuple] = {
    "epochs": ("int", 1, False), "batch_size": ("int", 1, False), "lr": ("number", 0, False),
    "weight_decay": ("number", 0, False), "warmup_epochs": ("int", 0, False),
    "warmup_lr": ("number", 0, False), "min_lr": ("number", 0, False),
    "grad_clip": ("number", 0, True), "seed": ("int", 0, False), "val_every": ("int", 1, False),
    "num_workers": ("int", 0, False), "double_step": ("bool", None, False),
}
DATA_TYPES: dict[str, tuple] = {
    "name": ("str", None, False), "npoints": ("int", 1, False), "protocol": ("str", None, False),
    "up_axis": ("str", None, False), "num_classes": ("int", 1, False),
    "samples_per_class": ("int", 1, False), "seed": ("int", 0, False),
    "noise": ("number", 0, False), "occlusion": ("number", 0, False),
    "rotation": ("str", None, False), "scale": ("list", None, False),
    "root": ("str", None, False), "format": ("str", None, False),
    "num_category": ("int", 1, False), "raw_points": ("int", 1, False),
    "cache_dir": ("str", None, True), "shape_names": ("str", None, True),
    "h5_files": ("dict", None, True), "way": ("int", 1, False), "shot": ("int", 1, False),
    "fold": ("int", 0, False), "variant": ("str", None, False),
}
_KIND_NAMES = {"int": "an integer", "number": "a number", "str": "a string", "list": "a list",
               "dict": "a mapping", "bool": "true or false"}


def _kind_of(default: Any) -> str | None:
    """The kind a default value asks for (None: any value)."""
    for kind, types in (("bool", bool), ("int", int), ("number", float), ("str", str),
                        ("list", (list, tuple)), ("dict", Mapping)):
        if isinstance(default, types):
            return kind
    return None


def _fits(value: Any, kind: str | None) -> bool:
    if kind is None:
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never to a config
        return False
    types = {"int": int, "number": (int, float), "str": str, "list": (list, tuple),
             "dict": Mapping}[kind]
    return isinstance(value, types)


def _check_values(source: str, section: str, values: Mapping, spec: Mapping[str, tuple],
                  what: str) -> None:
    """Unknown keys and values of the wrong kind or below their minimum -> ValueError."""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ValueError(f"{source}: unknown {what} key(s) "
                         f"{[f'{section}.{k}' for k in unknown]}; valid keys: {sorted(spec)}")
    for key, value in values.items():
        kind, low, nullable = spec[key]
        if value is None and nullable:
            continue
        ok = value is not None and _fits(value, kind)
        if ok and low is not None and kind in ("int", "number"):
            ok = value >= low
        if not ok:
            need = _KIND_NAMES.get(kind, "any value") if kind else "any value"
            if low is not None and kind in ("int", "number"):
                need += f" >= {low}"
            need += " or null" if nullable else ""
            raise ValueError(f"{source}: {section}.{key} must be {need}; got {value!r} "
                             f"({type(value).__name__})")


def _model_spec(name: str) -> dict[str, tuple]:
    import inspect

    from pointclora.models import BACKBONES

    if name not in BACKBONES:
        raise ValueError(f"model.name must be one of {sorted(BACKBONES)}; got {name!r}")
    spec = {"name": ("str", None, False), "pretrained": ("str", None, True)}
    for key, param in inspect.signature(BACKBONES[name]).parameters.items():
        kind = _kind_of(param.default)
        spec[key] = (kind, 0 if kind in ("int", "number") else None, key == "cls_dim")
    return spec


def _adapter_spec(method: str) -> dict[str, tuple]:
    from pointclora.adapters import DEFAULT_OPTIONS

    if method not in DEFAULT_OPTIONS:
        raise ValueError(f"adapter.method must be one of {sorted(DEFAULT_OPTIONS)}; "
                         f"got {method!r}")
    spec = {"method": ("str", None, False)}
    spec.update({key: (_kind_of(default), None, default is None)
                 for key, default in DEFAULT_OPTIONS[method].items()})
    return spec


def _data_spec(name: str) -> dict[str, tuple]:
    from pointclora.data.build import COMMON_KEYS, DATASETS, KEYS

    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {sorted(DATASETS)}; got {name!r}")
    return {key: DATA_TYPES.get(key, (None, None, True)) for key in COMMON_KEYS | KEYS[name]}


def validate(cfg: dict, source: str = "config") -> dict:
    """Refuse what the engine would otherwise ignore or trip over later.

    One rule for every section: an unknown key, or a value of the wrong type (a bool is not
    an integer) or out of range, is an error naming the key, what it takes and what it got.
    """
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
    if train["amp"] not in AMP_MODES:
        raise ValueError(f"{source}: train.amp must be one of {AMP_MODES}, got {train['amp']!r}")
    _check_values(source, "train", {k: v for k, v in train.items() if k != "amp"},
                  TRAIN_TYPES, "train")
    if train.get("double_step") and train["amp"] == "fp16":
        raise ValueError(f"{source}: train.double_step steps on unscaled gradients; use it "
                         "with amp null or bf16, not fp16")
    _check_values(source, "data", cfg["data"], _data_spec(cfg["data"]["name"]), "data")
    _check_values(source, "model", cfg["model"], _model_spec(cfg["model"].get("name")),
                  "model")
    _check_values(source, "adapter", cfg["adapter"],
                  _adapter_spec(cfg["adapter"].get("method")), "adapter")
    if cfg["output_dir"] is not None and not isinstance(cfg["output_dir"], str):
        raise ValueError(f"{source}: output_dir must be a path or null; got {cfg['output_dir']!r}")
    return cfg


def add_override_argument(parser) -> None:
    """The one ``--set KEY=VALUE`` option every tool shares (repeatable, several per flag)."""
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+",
                        default=[], help="override a config value, e.g. train.lr=1e-3 "
                        "(dotted key, YAML value; repeatable)")


TRUST_PICKLE_WARNING = (
    "warning: --trust-pickle: weights files that pickle Python objects besides tensors will "
    "be unpickled in full, and unpickling runs whatever code such a file names. Use it only "
    "for files from a source you trust; `tools/convert_checkpoint.py` makes a safe copy once."
)


def add_trust_pickle_argument(parser) -> None:
    """``--trust-pickle``: an explicit, per-call opt-in; never read from a stored config."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow model.pretrained files that pickle Python objects (runs any "
                        "code they hold: only for files you trust; prefer "
                        "tools/convert_checkpoint.py)")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Resolved run config: defaults < `_base_` files < the file < `overrides`."""
    cfg = deep_merge(DEFAULTS, _read_yaml(Path(path), ()))
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg, source=str(path))


def checkpoint_config(ckpt: Mapping, source: str, overrides: Iterable[str] = (),
                      config: str | Path | None = None) -> dict:
    """The config a tool runs a checkpoint with: the ``config`` file when given, else the one
    stored in ``ckpt`` (read from ``source``), with ``overrides`` (``--set``) applied."""
    if config:
        return load_config(config, overrides)
    return validate(apply_overrides(ckpt["config"], overrides), str(source))


def dump_config(cfg: Mapping, path: str | Path, changes: Iterable[Mapping] = ()) -> None:
    """Write a resolved config that `load_config` reads back to the same dict.

    `changes` (a resumed run's `{"epoch", "key", "old", "new"}` records) head the file as
    comments, so the file says which values held before which epoch.
    """
    lines = [f"# from epoch {c['epoch']}: {c['key']} = {c['new']!r} (before: {c['old']!r})\n"
             for c in changes]
    if lines:
        lines.insert(0, "# resumed with config changes; the values below hold from then on\n")
    with open(path, "w") as f:
        f.writelines(lines)
        yaml.safe_dump(dict(cfg), f, sort_keys=False, default_flow_style=False)
