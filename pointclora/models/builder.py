"""Backbone construction from the ``model:`` section of a config."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from .checkpoint import load_pretrained
from .registry import BACKBONES


def build_model(cfg_model: Mapping, trust_pickle: bool = False) -> nn.Module:
    """``{name: <registered backbone>, <constructor keywords>, pretrained: path|null}``.

    ``name`` is a key of :data:`BACKBONES` (``point_mae``, ``point_bert``, ...). A
    ``pretrained`` path is loaded with :func:`~pointclora.models.load_pretrained` (strict)
    against the registered entry's ``checkpoint`` spec, or with its own ``load_weights(model,
    path, trust_pickle=...)`` when it has one (a reader for formats torch cannot load).
    ``trust_pickle`` is an argument of the call, never a config key: a stored config must not
    be able to turn on unpickling of arbitrary objects.
    """
    cfg = dict(cfg_model)
    name = cfg.pop("name", None)
    if name not in BACKBONES:
        raise ValueError(f"model.name must be one of {sorted(BACKBONES)}, got {name!r}")
    pretrained = cfg.pop("pretrained", None)
    cls = BACKBONES[name]  # a class, or a factory function
    valid = list(inspect.signature(cls).parameters)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown} for {name}; valid options: "
                         f"{['name', *valid, 'pretrained']}")
    model = cls(**cfg)
    if pretrained and hasattr(cls, "load_weights"):  # its own reader (timm ViTs: Google's npz)
        cls.load_weights(model, pretrained, trust_pickle=trust_pickle)
    elif pretrained:
        load_pretrained(model, pretrained, trust_pickle=trust_pickle,
                        spec=getattr(cls, "checkpoint", None))
    return model
