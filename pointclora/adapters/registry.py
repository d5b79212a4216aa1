"""The method registry, the options every method declares, and the models' declared defaults.

A method is one module: an options dataclass (defaults, types and checks, like PEFT's
``LoraConfig``), a :class:`Method` subclass saying which modules it wraps and how, and what
state it shares across layers, registered with :func:`register_method`. ``api.py`` only
iterates this registry. What a method needs to know about a model (where to inject by
default, its task head, its learned tokens) comes from the model: a class attribute
``adapter_defaults`` or :func:`register_model_defaults` for a class one cannot edit.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

# keys a model may declare in ``adapter_defaults``
MODEL_DEFAULT_KEYS = ("target_modules", "blocks", "head", "tokens")


# --- option checks -------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """A predicate on an option value and the words that say what it accepts."""

    test: Callable[[Any], bool]
    expected: str


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(v: Any, empty_ok: bool = False) -> bool:
    if isinstance(v, str):
        try:
            re.compile(v)
        except re.error:
            return False
        return True
    return isinstance(v, (list, tuple)) and (empty_ok or bool(v)) and all(
        isinstance(t, str) and t for t in v)


BOOL = Check(lambda v: isinstance(v, bool), "a bool")
POSITIVE_INT = Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                     "an int >= 1")
POSITIVE = Check(lambda v: _number(v) and v > 0, "a number > 0 (YAML: write 1.0e-8, not 1e-8)")
NON_NEGATIVE = Check(lambda v: _number(v) and v >= 0,
                     "a number >= 0 (YAML: write 1.0e-3, not 1e-3)")
NAMES = Check(lambda v: v is None or _names(v),
              "null, a regex string, or a non-empty list of module-name suffixes")


def choice(*values: Any) -> Check:
    return Check(lambda v: v in values, "one of " + ", ".join(map(str, values)))


def option(default: Any, check: Check, help: str, *, model_default: str | None = None,
           needed_if: str | bool = False) -> Any:
    """A dataclass field of an options class.

    ``model_default``: the ``adapter_defaults`` key that fills a ``None`` value.
    ``needed_if``: the bool option (or ``True``: always) under which ``None`` is an error
    once the model's defaults are read.
    """
    meta = {"check": check, "help": help, "model_default": model_default,
            "needed_if": needed_if}
    return dataclasses.field(default=default, metadata=meta)


# --- options ------------------------------------------------------------------------------

@dataclass
class Options:
    """Base of every method's options. Construction checks every value (``ValueError``
    naming the option, what it takes and what it got)."""

    method: ClassVar[str] = "adapter"  # set by register_method

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check: Check = f.metadata["check"]
            if not check.test(value):
                raise ValueError(
                    f"{self.method} option {f.name} must be {check.expected}, got {value!r} "
                    f"({type(value).__name__})")
            if isinstance(value, tuple):
                setattr(self, f.name, list(value))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Options:
        """The options from a plain mapping (a config section, a saved file)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for adapter method {cls.method!r}; "
                             f"valid: {', '.join(valid) or '(none)'}")
        return cls(**copy.deepcopy(dict(values)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def model_default(cls, key: str, value: Any) -> Any:
        """The model's declared default ``value`` for ``key``, as this method uses it."""
        return value

    def bind(self, model: nn.Module) -> Options:
        """``None`` options filled from the model's declared defaults; an option still
        ``None`` that is needed raises ``ValueError`` saying what to set."""
        declared = model_defaults(model)
        filled, missing = {}, []
        for f in dataclasses.fields(self):
            key = f.metadata["model_default"]
            if key is None or getattr(self, f.name) is not None:
                continue
            value = self.model_default(key, copy.deepcopy(declared.get(key)))
            needed = f.metadata["needed_if"]
            if value == [] and isinstance(needed, str):  # declared: the model has none
                filled[needed] = False
                continue
            if value is None and (needed is True or (needed and getattr(self, needed))):
                unless = "" if needed is True else f" or {needed}=False"
                missing.append(f"{f.name}=... ({f.metadata['help']}){unless}")
            filled[f.name] = value
        if missing:
            raise ValueError(
                f"{type(model).__name__} declares no adapter defaults for {self.method}: pass "
                f"{'; '.join(missing)}. A model class declares them as adapter_defaults, or "
                "with register_model_defaults for a class one cannot edit")
        return dataclasses.replace(self, **filled)


@dataclass
class FullOptions(Options):
    """Full fine-tuning has no options: everything trains."""


@dataclass
class FrozenBackboneOptions(Options):
    """What trains besides the adapters when the backbone is frozen (PEFT's
    ``modules_to_save``), and the BatchNorm statistics."""

    train_head: bool = option(True, BOOL, "keep the task head trainable")
    train_tokens: bool = option(True, BOOL, "keep the learned tokens trainable")
    freeze_bn_stats: bool = option(
        True, BOOL, "BatchNorm layers with no trainable parameter stay in eval mode")
    head: list[str] | str | None = option(
        None, NAMES, "names of the task head modules", model_default="head",
        needed_if="train_head")
    tokens: list[str] | str | None = option(
        None, NAMES, "names of the learned token parameters", model_default="tokens",
        needed_if="train_tokens")
    modules_to_save: list[str] | str | None = option(
        None, NAMES, "more modules or parameters that train and are saved")

    def kept_trainable(self) -> dict[str, list[str] | str]:
        """Option name -> name pattern of the parameters that train besides the adapters."""
        kept = {"head": self.head if self.train_head else None,
                "tokens": self.tokens if self.train_tokens else None,
                "modules_to_save": self.modules_to_save}
        return {name: pattern for name, pattern in kept.items() if pattern is not None}


@dataclass
class LowRankOptions(FrozenBackboneOptions):
    """Options of the methods that wrap linear layers with a rank-``r`` weight delta."""

    target_modules: list[str] | str | None = option(
        None, NAMES, "names of the linear layers to adapt", model_default="target_modules",
        needed_if=True)
    r: int = option(8, POSITIVE_INT, "rank")


@dataclass
class SplitQKVOptions(LowRankOptions):
    split_qkv: bool = option(
        True, BOOL, "a target whose last name part is qkv gets separate q, k, v modules")

    def n_slices(self, name: str) -> int:
        """Output slices adapted separately in the layer called ``name``."""
        return 3 if self.split_qkv and name.rpartition(".")[2] == "qkv" else 1


# --- methods --------------------------------------------------------------------------------

class Method:
    """A fine-tuning method, built from its resolved (bound) options.

    Subclasses set ``name`` and ``Options``. Methods that inject override ``wrap``; the
    modules it returns replace the targets (``targets()``: names or a regex, matched
    against modules of ``target_types``), keep the wrapped module as ``base_layer`` and
    derive from :class:`~pointclora.adapters.base.AdapterLayer`. Parameters the injection
    creates train; everything else is frozen unless ``trains_backbone``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]
    trains_backbone: ClassVar[bool] = False
    target_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __init__(self, options: Options):
        self.options = options

    def targets(self) -> list[str] | str | None:
        """Which modules to wrap (None: the method injects nothing)."""
        return getattr(self.options, "target_modules", None)

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        raise NotImplementedError(f"{self.name} wraps no module")

    def shared_modules(self) -> dict[str, nn.Module]:
        """Modules shared by the wrappers, registered once on the model under these names."""
        return {}


METHOD_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``apply_adapter(model, cls.name)``."""
    if cls.name in METHOD_REGISTRY:
        raise ValueError(f"an adapter method named {cls.name!r} is already registered")
    if any(m.Options is cls.Options for m in METHOD_REGISTRY.values()):
        raise ValueError(f"{cls.name}: every method declares its own Options class")
    if not cls.trains_backbone and not issubclass(cls.Options, FrozenBackboneOptions):
        raise TypeError(f"{cls.name}: a method with a frozen backbone needs Options derived "
                        "from FrozenBackboneOptions")
    cls.Options.method = cls.name
    METHOD_REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHOD_REGISTRY:
        raise ValueError(f"unknown adapter method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHOD_REGISTRY[name]


class _MethodNames(Sequence):
    """The registered method names, in registration order (a live view)."""

    def __getitem__(self, index):
        return tuple(METHOD_REGISTRY)[index]

    def __len__(self) -> int:
        return len(METHOD_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in METHOD_REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(METHOD_REGISTRY))


class _DefaultOptions(Mapping):
    """``{method: {option: default}}`` of the registered methods (a live view)."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return METHOD_REGISTRY[name].Options().to_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(METHOD_REGISTRY))

    def __len__(self) -> int:
        return len(METHOD_REGISTRY)


METHODS: Sequence[str] = _MethodNames()
DEFAULT_OPTIONS: Mapping[str, dict[str, Any]] = _DefaultOptions()


# --- what models declare --------------------------------------------------------------------

_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model_defaults(cls_or_qualname: type | str, defaults: Mapping[str, Any]) -> None:
    """Declare adapter defaults for a model class one cannot edit (a third-party model),
    by class or by ``"module.QualName"`` (no import of that package needed); keys are those
    of ``MODEL_DEFAULT_KEYS``. Overrides what the class itself declares."""
    unknown = sorted(set(defaults) - set(MODEL_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"unknown adapter default key(s) {unknown}; valid: "
                         f"{', '.join(MODEL_DEFAULT_KEYS)}")
    key = cls_or_qualname if isinstance(cls_or_qualname, str) else _qualname(cls_or_qualname)
    _MODEL_DEFAULTS[key] = copy.deepcopy(dict(defaults))


def model_defaults(model: nn.Module) -> dict[str, Any]:
    """What the model's class (nearest in its MRO) declares: registered or ``adapter_defaults``."""
    for cls in type(model).__mro__:
        if _qualname(cls) in _MODEL_DEFAULTS:
            return copy.deepcopy(_MODEL_DEFAULTS[_qualname(cls)])
        if "adapter_defaults" in vars(cls):
            return copy.deepcopy(dict(cls.adapter_defaults))
    return {}
