"""Loading the official Point-MAE / Point-BERT checkpoints, with a precise report.

The official loaders used ``load_state_dict(strict=False)`` and only printed mismatches, so a
wrong file silently trained from scratch. Here every file is matched key by key against the
model: keys the layout does not carry by design are reported as expected, keys that only
pre-training uses are reported as ignored, and anything else is a :class:`CheckpointError`.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("pointclora")

HEAD_PREFIX = "cls_head_finetune"

# Where users get the files; quoted in error messages.
WEIGHTS_HINT = (
    "the official weights of the Point-MAE and Point-BERT projects are linked from their GitHub "
    "pages (Point-MAE's releases: pretrain.pth and fine-tuned files; Point-BERT's 'Pretrained "
    "Models' table: Point-BERT.pth and fine-tuned files)"
)

_SHOWN = 5  # offending keys quoted in an error message
_FAMILY_NAMES = {"point_mae": "Point-MAE", "point_bert": "Point-BERT"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the model as it stands."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a ``FileNotFoundError``)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that can only be read by unpickling arbitrary objects, refused by default."""


@dataclass(frozen=True)
class Layout:
    """One official way of storing the backbone inside a checkpoint's state dict."""

    name: str
    family: str | None  # None: told apart by its keys (fine-tuned files of both backbones)
    prefix: str  # prefix of the backbone keys
    dropped: tuple[str, ...] = ()  # backbone keys (after the prefix) used only in pre-training
    fresh: tuple[str, ...] = ()  # model keys the layout does not hold; they keep their init


PRETRAIN_LAYOUTS = (
    Layout("Point-MAE pre-training checkpoint", "point_mae", "MAE_encoder.",
           fresh=("cls_token", "cls_pos")),
    Layout("Point-BERT pre-training checkpoint", "point_bert", "transformer_q.",
           dropped=("mask_token", "lm_head.", "cls_head.")),
)
FINETUNE_LAYOUT = Layout("fine-tuned checkpoint", None, "")

_CONTAINER_KEYS = ("base_model", "model")
_WRAPPER_PREFIXES = ("module.", "base_model.")  # DataParallel / wrapped-model prefixes


@dataclass
class LoadReport:
    """What :meth:`load_pretrained` did with each key of a checkpoint.

    ``loaded``: model keys set from the file. ``expected_missing``: model keys the file does
    not hold by design (the head, Point-MAE's cls tokens), left at their initial values.
    ``missing``: other model keys the file lacks (only possible with ``strict=False``).
    ``unexpected``: file keys the model has no place for (only with ``strict=False``).
    ``ignored``: file keys left out on purpose: parts only pre-training uses (decoders, dVAE,
    momentum encoder...) and a head skipped for its ``cls_dim``.
    """

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    head_loaded: bool = False
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.expected_missing)
        lines = [
            f"Loaded {len(self.loaded)}/{total} model tensors from {self.path} "
            f"({self.layout}); head {'loaded' if self.head_loaded else 'not loaded'}.",
            f"  expected missing (kept at init): {_summary(self.expected_missing)}",
            f"  ignored (not used by the fine-tune model): {_summary(self.ignored)}",
        ]
        if self.missing:
            lines.append(f"  MISSING (kept at init): {_summary(self.missing)}")
        if self.unexpected:
            lines.append(f"  UNEXPECTED (not used): {_summary(self.unexpected)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _summary(keys: list[str]) -> str:
    """Keys grouped by top-level module: ``cls_token, cls_head_finetune.* (16)``."""
    if not keys:
        return "none"
    groups: dict[str, list[str]] = {}
    for key in keys:
        depth = 2 if key.startswith(tuple(lay.prefix for lay in PRETRAIN_LAYOUTS)) else 1
        groups.setdefault(".".join(key.split(".")[:depth]), []).append(key)
    return ", ".join(members[0] if len(members) == 1 else f"{name}.* ({len(members)})"
                     for name, members in groups.items())


def _quote(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The flat state dict held by a checkpoint file, on the CPU, wrapper prefixes removed.

    Accepts the official container (a dict with ``base_model``), a dict with ``model``, or a
    bare state dict. Files are read with ``weights_only=True``; a file that also pickles other
    Python objects (a config object, say) raises :class:`UnsafeCheckpointError` unless
    ``trust_pickle=True`` is passed for this call (the official code read such files in full,
    which runs any code they hold).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path}: no such checkpoint file. Nothing is downloaded at run time: {WEIGHTS_HINT}."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    obj = _torch_load(path, trust_pickle)
    state = obj
    if isinstance(obj, Mapping):
        state = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (expected a dict of tensors, "
            f"or a dict with one under {' or '.join(map(repr, _CONTAINER_KEYS))})"
        )
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        top = list(obj)[:_SHOWN] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{path}: not a state dict of tensors; non-tensor entries: {_quote(bad)} "
            f"(top-level keys: {top})"
        )
    return {_strip_wrappers(k): v for k, v in state.items()}


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _torch_load(path: Path, trust_pickle: bool = False):
    """``torch.load`` that never runs code from the file unless the caller asks for it.

    A pickle can call any importable function while it is read (``subprocess``, ``os.system``),
    so a weights file is only unpickled in full when ``trust_pickle=True`` was passed for this
    call; never from a stored config.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = ", ".join(re.findall(r"GLOBAL (\S+)", str(err)))
        if not found:  # not a refused global: a corrupt file
            raise _unreadable(path, err) from err
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle it: besides tensors it pickles Python objects "
                f"({found}), and unpickling runs whatever code the file names. If you trust "
                "where the file comes from, convert it once to a weights-only file with "
                f"`python tools/convert_checkpoint.py {path} OUT.safetensors --trust-pickle` "
                "(or pass --trust-pickle / trust_pickle=True for this one load)."
            ) from err
        logger.warning(
            "%s pickles Python objects besides tensors (%s); unpickling it in full because "
            "trust_pickle=True was passed: this runs any code the file contains.", path, found)
    except Exception as err:  # corrupt files raise many types (EOFError, RuntimeError, ...)
        raise _unreadable(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """Error for a file torch.load cannot read, with the informative line of torch's message."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = found.group(1) if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {line.strip()[:200]}); "
        "is the file complete?"
    )


def detect_layout(state: Mapping[str, torch.Tensor]) -> tuple[Layout, str | None]:
    """The layout of a state dict and the backbone family it holds (None: no transformer)."""
    for layout in PRETRAIN_LAYOUTS:
        if any(k.startswith(layout.prefix) for k in state):
            return layout, layout.family
    if any(k.startswith("reduce_dim.") for k in state):
        return FINETUNE_LAYOUT, "point_bert"
    if any(k.startswith("blocks.blocks.") for k in state):
        return FINETUNE_LAYOUT, "point_mae"
    return FINETUNE_LAYOUT, None


def _implied_config(state: Mapping[str, torch.Tensor], head_last: str) -> dict[str, int]:
    """Config values a backbone state dict pins down by its shapes."""
    implied = {}
    if "norm.weight" in state:
        implied["trans_dim"] = state["norm.weight"].shape[0]
    if "encoder.second_conv.3.weight" in state:
        implied["encoder_dims"] = state["encoder.second_conv.3.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.blocks\.(\d+)\.", k))}
    if blocks:
        implied["depth"] = max(blocks) + 1
    if f"{head_last}.weight" in state:
        implied["cls_dim"] = state[f"{head_last}.weight"].shape[0]
    return implied


def load_into(model: nn.Module, path: str | Path, strict: bool = True,
              trust_pickle: bool = False) -> LoadReport:
    """Load a checkpoint file into a backbone; see :class:`LoadReport` and docs/models.md."""
    state = read_state_dict(path, trust_pickle)
    layout, family = detect_layout(state)
    own = model.state_dict()
    prefix = layout.prefix
    if family is None or not any(k.startswith(prefix) and k[len(prefix):] in own for k in state):
        raise CheckpointError(
            f"{path}: no {_FAMILY_NAMES[model.family]} backbone found (no transformer keys such "
            f"as blocks.blocks.0.*); the file holds {_quote(list(state))}. Expected a Point-MAE "
            f"or Point-BERT checkpoint: {WEIGHTS_HINT}."
        )
    if family != model.family:
        raise CheckpointError(
            f"{path}: this is a {_FAMILY_NAMES[family]} checkpoint (keys of a "
            f"{layout.name}) but the model is {type(model).__name__}; build the model with "
            f"name: {family} to use it."
        )

    ignored = [k for k in state if not k.startswith(prefix)]
    candidates = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name.startswith(layout.dropped):
                ignored.append(key)
            else:
                candidates[name] = value

    notes = []
    head_own = [k for k in own if k.startswith(HEAD_PREFIX + ".")]
    head_file = [k for k in candidates if k.startswith(HEAD_PREFIX + ".")]
    head_loaded = bool(head_file) and set(head_file) == set(head_own) and all(
        candidates[k].shape == own[k].shape for k in head_own)
    if head_file and not head_loaded:
        implied = _implied_config(candidates, model.head_last_linear).get("cls_dim")
        why = (f"cls_dim {implied} in the file, {model.cls_dim} in the model"
               if implied is not None and implied != model.cls_dim else
               "its keys or shapes differ from the model's head")
        notes.append(f"head skipped ({why}); it keeps its initial weights and is trained anew")
        ignored += [prefix + k for k in head_file]
        for k in head_file:
            del candidates[k]

    mismatched = [k for k in candidates if k in own and candidates[k].shape != own[k].shape]
    if mismatched:
        shapes = [f"{prefix}{k} {list(candidates[k].shape)} in the file vs {list(own[k].shape)}"
                  for k in mismatched]
        raise CheckpointError(
            f"{path}: shape mismatch for {len(mismatched)} key(s): {_quote(shapes)}."
            f"{_config_hint(model, candidates)}"
        )

    loadable = {k: v for k, v in candidates.items() if k in own}
    unexpected = [prefix + k for k in candidates if k not in own]
    absent = [k for k in own if k not in loadable]
    expected = [k for k in absent if k.startswith(HEAD_PREFIX + ".") or k in layout.fresh]
    missing = [k for k in absent if k not in expected]
    if strict and (missing or unexpected):
        problems = [f"{what} {len(keys)} key(s): {_quote(keys)}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"{path} ({layout.name}) does not match {type(model).__name__}: "
            f"{'; '.join(problems)}.{_config_hint(model, candidates)} "
            "Pass strict=False to load the matching part only."
        )

    model.load_state_dict(loadable, strict=False)
    report = LoadReport(
        path=str(path), layout=layout.name, loaded=[k for k in own if k in loadable],
        missing=missing,
        expected_missing=expected, unexpected=unexpected, ignored=ignored,
        head_loaded=head_loaded, notes=notes,
    )
    logger.info("%s", report)
    warnings = notes + ([f"{len(missing)} missing and {len(unexpected)} unexpected key(s)"]
                        if missing or unexpected else [])
    if warnings:
        logger.warning("%s: %s", path, "; ".join(warnings))
    return report


def _config_hint(model: nn.Module, candidates: Mapping[str, torch.Tensor]) -> str:
    implied = _implied_config(candidates, model.head_last_linear)
    implied.pop("cls_dim", None)  # a different head is fine
    diff = [f"{k}={v} (model: {model.config[k]})" for k, v in implied.items()
            if model.config[k] != v]
    return f" The file implies {', '.join(diff)}." if diff else ""
