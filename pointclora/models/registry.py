"""The backbone registry: the ``model.name`` of a config -> the model class.

A backbone registers itself with ``@register_backbone("name")`` in its own module; every
module of ``pointclora.models`` is imported with the package, so one new file is all a new
backbone needs. The class's ``checkpoint`` attribute (a
:class:`~pointclora.models.checkpoint.CheckpointSpec`) tells the loader which files are its
own, and ``adapter_defaults`` tells the adapters where to inject (see docs/architecture.md).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

Factory = Callable[..., nn.Module]  # a model class, or a function returning a model
BACKBONES: dict[str, Factory] = {}


def register_backbone(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make a model class (or factory function) buildable as
    ``build_model({"name": name, <its keyword arguments>})``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backbone name must be a non-empty string, got {name!r}")

    def add(cls: Factory) -> Factory:
        taken = BACKBONES.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"backbone name {name!r} is already registered by "
                             f"{taken.__module__}.{taken.__qualname__}")
        BACKBONES[name] = cls
        return cls

    return add

