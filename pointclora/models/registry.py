"""The backbone registry: the ``model.name`` of a config -> the model class.

A backbone registers itself with ``@register_backbone("name")`` in its own module; every module
of ``pointclora.models`` is imported with the package, so one new file is all a new backbone
needs. The class's ``checkpoint`` attribute (a :class:`~pointclora.models.checkpoint.CheckpointSpec`)
tells the loader which files are its own, and ``adapter_defaults`` tells the adapters where to
inject (see docs/architecture.md).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

BACKBONES: dict[str, type[nn.Module]] = {}


def register_backbone(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` buildable as ``build_model({"name": name, ...})``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backbone name must be a non-empty string, got {name!r}")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        taken = BACKBONES.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"backbone name {name!r} is already registered by "
                             f"{taken.__module__}.{taken.__qualname__}")
        BACKBONES[name] = cls
        return cls

    return add

