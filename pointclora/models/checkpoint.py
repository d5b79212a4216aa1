"""Loading checkpoint files into the registered backbones, with a precise report.

The official Point-MAE / Point-BERT loaders used ``load_state_dict(strict=False)`` and only
printed mismatches, so a wrong file silently trained from scratch. Here each backbone class
declares its file layouts (:class:`CheckpointSpec`), the loader recognises a file among the
layouts of every registered backbone, and the file is matched key by key against the
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

_SHOWN = 5  # offending keys quoted in an error message
_CONTAINER_KEYS = ("base_model", "model", "model_state_dict")  # last: official part seg
_WRAPPER_PREFIXES = ("module.", "base_model.")  # DataParallel / wrapped-model prefixes
# Files of this package that hold more than backbone weights (recognised to refuse them with
# the right advice): adapter files (pointclora.adapters.adapter_state_dict) and training
# checkpoints (pointclora.engine.checkpoint, marked by format_version).
ADAPTER_FORMAT = "pointclora-adapter"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the model as it stands."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a ``FileNotFoundError``)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that can only be read by unpickling arbitrary objects, refused by default."""


@dataclass(frozen=True)
class Layout:
    """One way a checkpoint file stores a backbone (timm's ``checkpoint_filter_fn``, as data).

    A file is of this layout when, for every prefix in ``marks``, one of its keys starts with
    it; the layout with the most marks wins (a Point-BERT fine-tuned file also carries the
    ``blocks.blocks.`` mark of Point-MAE's). Keys under ``prefix`` are the backbone's: the
    prefix is removed, then each ``(regex, replacement)`` of ``renames`` is applied in turn.
    """

    name: str  # shown in reports and errors: "Point-MAE pre-training checkpoint"
    marks: tuple[str, ...]  # key prefixes that all occur in such a file
    prefix: str = ""  # prefix of the backbone keys
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement) from file to model names
    dropped: tuple[str, ...] = ()  # backbone keys (after renaming) used only in pre-training
    fresh: tuple[str, ...] = ()  # model keys the layout does not hold; they keep their init

    def matches(self, state: Mapping[str, torch.Tensor]) -> bool:
        return all(any(k.startswith(mark) for k in state) for mark in self.marks)

    def model_key(self, key: str) -> str | None:
        """The model's name for a file key, or None for a key outside the backbone."""
        if not key.startswith(self.prefix):
            return None
        name = key[len(self.prefix):]
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name


@dataclass(frozen=True, eq=False)
class CheckpointSpec:
    """What a backbone class knows about its checkpoint files: its ``checkpoint`` attribute.

    ``head``: module names of the task head, skipped with a note when the file's head was
    trained for another number of classes. ``classes``: (config option, key whose first
    dimension it sets), e.g. ``("cls_dim", "cls_head_finetune.8.weight")``. ``shapes`` and
    ``counts`` let errors name the config a file implies: option -> key whose first dimension
    it sets, and option -> regex whose group 1 numbers a repeated module (``depth``).
    ``weights_hint`` says where users get the files.
    """

    title: str  # the backbone in messages: "Point-MAE"
    layouts: tuple[Layout, ...]
    head: tuple[str, ...] = ()
    classes: tuple[str, str] | None = None
    shapes: Mapping[str, str] = field(default_factory=dict)
    counts: Mapping[str, str] = field(default_factory=dict)
    weights_hint: str = "download the weights once and pass their local path"

    def is_head(self, key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in self.head)

    def implied_config(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Config values a backbone state dict (model names) pins down by its shapes."""
        keys = dict(self.shapes)
        if self.classes:
            keys[self.classes[0]] = self.classes[1]
        implied = {option: state[key].shape[0] for option, key in keys.items() if key in state}
        for option, pattern in self.counts.items():
            found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
            if found:
                implied[option] = max(found) + 1
        return implied


def checkpoint_spec(model: nn.Module, spec: CheckpointSpec | None = None) -> CheckpointSpec:
    """``spec``, else the model's ``checkpoint`` attribute (its class's spec)."""
    spec = spec if spec is not None else getattr(model, "checkpoint", None)
    if not isinstance(spec, CheckpointSpec):
        raise TypeError(f"{type(model).__name__} declares no checkpoint layouts: give the class a "
                        "`checkpoint = CheckpointSpec(...)` attribute (see docs/architecture.md)")
    return spec


def _owners() -> dict[Layout, list[tuple[str, CheckpointSpec]]]:
    """Every registered layout -> the (name, spec) of the backbones that read it."""
    from .registry import BACKBONES

    owners: dict[Layout, list[tuple[str, CheckpointSpec]]] = {}
    for name, cls in BACKBONES.items():
        spec = getattr(cls, "checkpoint", None)
        for layout in spec.layouts if isinstance(spec, CheckpointSpec) else ():
            owners.setdefault(layout, []).append((name, spec))
    return owners


def detect_layout(state: Mapping[str, torch.Tensor],
                  own: CheckpointSpec | None = None) -> tuple[Layout | None, list[str]]:
    """The layout of a state dict and the registered backbones that read it ((None, []): none).

    The layout with the most marks wins; on a tie ``own``'s layouts come first.
    """
    owners = _owners()
    for layout in own.layouts if own else ():
        owners.setdefault(layout, [])
    found = [lay for lay in owners if lay.matches(state)]
    if not found:
        return None, []
    mine = set(own.layouts) if own else set()
    best = max(found, key=lambda lay: (len(lay.marks), lay in mine))
    return best, [name for name, _ in owners[best]]


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
    prefixes = tuple(lay.prefix for lay in _owners() if lay.prefix)  # MAE_encoder.blocks.* ...
    groups: dict[str, list[str]] = {}
    for key in keys:
        depth = 2 if key.startswith(prefixes) else 1
        groups.setdefault(".".join(key.split(".")[:depth]), []).append(key)
    return ", ".join(members[0] if len(members) == 1 else f"{name}.* ({len(members)})"
                     for name, members in groups.items())


def _quote(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def read_state_dict(path: str | Path, trust_pickle: bool = False, *,
                    weights_hint: str = CheckpointSpec.weights_hint) -> dict[str, torch.Tensor]:
    """The flat state dict held by a checkpoint file, on the CPU, wrapper prefixes removed.

    Accepts the official container (a dict with ``base_model``), a dict with ``model``, a
    bare state dict, or a ``.safetensors`` file. Files are read with ``weights_only=True``;
    a file that also pickles other Python objects (a config object, say) raises
    :class:`UnsafeCheckpointError` unless ``trust_pickle=True`` is passed for this call (the
    official code read such files in full, which runs any code they hold). PointCLoRA
    adapter files and adapter runs' training checkpoints are refused with the commands that
    use them (see :func:`_refuse_run_files`).
    ``weights_hint`` (where the weights come from) completes the missing-file message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path}: no such checkpoint file. Nothing is downloaded at run time: {weights_hint}."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(
        path, trust_pickle)
    state = obj
    if isinstance(obj, Mapping):
        _refuse_run_files(path, obj)
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


def _refuse_run_files(path: Path, obj: Mapping) -> None:
    """Refuse this package's adapter files and adapter-run checkpoints as backbone weights.

    Their weights are an adapter (and a head) over a frozen backbone; read as a backbone file,
    an adapter run's checkpoint would give its initial (often random) backbone and silently
    drop everything training learned. A ``full`` run's checkpoint holds the whole fine-tuned
    model under ``base_model`` and loads like an official fine-tuned file.
    """
    if obj.get("format") == ADAPTER_FORMAT:
        raise CheckpointError(
            f"{path} is a PointCLoRA adapter file (a {obj.get('method')!r} adapter), not backbone "
            "weights: set model.pretrained to the pre-trained file the adapter was trained on, "
            f"then add the adapter with pointclora.adapters.load_adapter(model, {str(path)!r})."
        )
    if "format_version" in obj and "adapter" in obj:
        raise CheckpointError(
            f"{path} is a PointCLoRA training checkpoint of a {obj.get('method')!r} run: it holds "
            "an adapter and a head trained over a frozen backbone, which model.pretrained cannot "
            "take (only backbone weights; the adapter and head would be lost). To evaluate or "
            f"predict with it: python tools/test.py --ckpt {path}. To reuse its weights in "
            "Python: rebuild the run's model with "
            "pointclora.engine.checkpoint.restore_model(ckpt['config'], ckpt) (or build the "
            "backbone of its config and pointclora.adapters.load_adapter(model, "
            "ckpt['adapter'])), then merge_adapter(model) to fold the adapter into the weights."
        )


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (tensors only, nothing to unpickle), e.g. written by
    ``tools/convert_checkpoint.py``."""
    from safetensors.torch import load_file  # noqa: PLC0415 (only for this format)

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # a header or size error of a damaged file
        raise _unreadable(path, err) from err


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


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True,
                    trust_pickle: bool = False, spec: CheckpointSpec | None = None) -> LoadReport:
    """Load a checkpoint file into a backbone; see :class:`LoadReport` and docs/models.md.

    ``spec`` defaults to the model's ``checkpoint`` attribute (a model built by a registered
    factory function gets the function's). The file's layout is recognised among the layouts
    of every registered backbone; a layout ``spec`` does not list is refused with the
    ``model.name`` that reads it.
    """
    spec = checkpoint_spec(model, spec)
    state = read_state_dict(path, trust_pickle, weights_hint=spec.weights_hint)
    layout, owners = detect_layout(state, spec)
    own = model.state_dict()
    if layout is not None and layout not in spec.layouts:
        title = _owners()[layout][0][1].title
        raise CheckpointError(
            f"{path}: this is a {title} checkpoint (keys of a {layout.name}) but the model is "
            f"{type(model).__name__}; build the model with name: {' or '.join(owners)} to use it."
        )
    file_keys = {}  # model name -> file key, for the backbone keys of the layout
    for key in state:
        name = layout.model_key(key) if layout else None
        if name is not None:
            file_keys[name] = key
    if not any(name in own for name in file_keys):
        marks = ", ".join(dict.fromkeys(f"{m}*" for lay in spec.layouts for m in lay.marks))
        raise CheckpointError(
            f"{path}: no {spec.title} backbone found (no keys of its checkpoint layouts: "
            f"{marks}); the file holds {_quote(list(state))}. Expected a {spec.title} "
            f"checkpoint: {spec.weights_hint}."
        )

    ignored = [k for k in state if layout.model_key(k) is None]
    candidates = {}
    for name, key in file_keys.items():
        if name.startswith(layout.dropped):
            ignored.append(key)
        else:
            candidates[name] = state[key]

    notes = []
    head_own = [k for k in own if spec.is_head(k)]
    head_file = [k for k in candidates if spec.is_head(k)]
    head_loaded = bool(head_file) and set(head_file) == set(head_own) and all(
        candidates[k].shape == own[k].shape for k in head_own)
    if head_file and not head_loaded:
        notes.append(f"head skipped ({_head_difference(model, spec, candidates)}); it keeps its "
                     "initial weights and is trained anew")
        ignored += [file_keys[k] for k in head_file]
        for k in head_file:
            del candidates[k]

    mismatched = [k for k in candidates if k in own and candidates[k].shape != own[k].shape]
    if mismatched:
        shapes = [f"{file_keys[k]} {list(candidates[k].shape)} in the file vs "
                  f"{list(own[k].shape)}" for k in mismatched]
        raise CheckpointError(
            f"{path}: shape mismatch for {len(mismatched)} key(s): {_quote(shapes)}."
            f"{_config_hint(model, spec, candidates)}"
        )

    loadable = {k: v for k, v in candidates.items() if k in own}
    unexpected = [file_keys[k] for k in candidates if k not in own]
    absent = [k for k in own if k not in loadable]
    expected = [k for k in absent if spec.is_head(k) or k in layout.fresh]
    missing = [k for k in absent if k not in expected]
    if strict and (missing or unexpected):
        problems = [f"{what} {len(keys)} key(s): {_quote(keys)}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"{path} ({layout.name}) does not match {type(model).__name__}: "
            f"{'; '.join(problems)}.{_config_hint(model, spec, candidates)} "
            "Pass strict=False to load the matching part only."
        )

    model.load_state_dict(loadable, strict=False)
    report = LoadReport(
        path=str(path), layout=layout.name, loaded=[k for k in own if k in loadable],
        missing=missing, expected_missing=expected, unexpected=unexpected, ignored=ignored,
        head_loaded=head_loaded, notes=notes,
    )
    logger.info("%s", report)
    warnings = notes + ([f"{len(missing)} missing and {len(unexpected)} unexpected key(s)"]
                        if missing or unexpected else [])
    if warnings:
        logger.warning("%s: %s", path, "; ".join(warnings))
    return report


def _head_difference(model: nn.Module, spec: CheckpointSpec,
                     candidates: Mapping[str, torch.Tensor]) -> str:
    if spec.classes:
        option = spec.classes[0]
        implied = spec.implied_config(candidates).get(option)
        current = getattr(model, "config", {}).get(option)
        if implied is not None and current is not None and implied != current:
            return f"{option} {implied} in the file, {current} in the model"
    return "its keys or shapes differ from the model's head"


def _config_hint(model: nn.Module, spec: CheckpointSpec,
                 candidates: Mapping[str, torch.Tensor]) -> str:
    """`` The file implies depth=12 (model: 2).``: config values that differ (a head may)."""
    implied = spec.implied_config(candidates)
    if spec.classes:
        implied.pop(spec.classes[0], None)  # a different head is fine
    config = getattr(model, "config", {})
    diff = [f"{k}={v} (model: {config[k]})" for k, v in implied.items()
            if k in config and config[k] != v]
    return f" The file implies {', '.join(diff)}." if diff else ""
