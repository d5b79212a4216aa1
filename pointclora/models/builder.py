"""Backbone construction from the ``model:`` section of a config."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from .backbones import PointBERT, PointMAE, PointTransformer

BACKBONES: dict[str, type[PointTransformer]] = {"point_mae": PointMAE, "point_bert": PointBERT}


def build_model(cfg_model: Mapping, trust_pickle: bool = False) -> PointTransformer:
    """``{name: point_mae|point_bert, <constructor keywords>, pretrained: path|null}``.

    A ``pretrained`` path is loaded with :meth:`PointTransformer.load_pretrained` (strict).
    ``trust_pickle`` is an argument of the call, never a config key: a stored config must not
    be able to turn on unpickling of arbitrary objects.
    """
    cfg = dict(cfg_model)
    name = cfg.pop("name", None)
    if name not in BACKBONES:
        raise ValueError(f"model.name must be one of {sorted(BACKBONES)}, got {name!r}")
    pretrained = cfg.pop("pretrained", None)
    cls = BACKBONES[name]
    valid = list(inspect.signature(cls).parameters)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown} for {name}; valid options: "
                         f"{['name', *valid, 'pretrained']}")
    model = cls(**cfg)
    if pretrained:
        model.load_pretrained(pretrained, trust_pickle=trust_pickle)
    return model
