"""AdamW with the official Point-MAE / Point-BERT weight-decay groups."""
from __future__ import annotations

import torch
from torch import nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    """The official `add_weight_decay` rule: 1-D tensors, biases and tokens skip decay.

    `cls_pos` is 3-D and has no "token" in its name, so it IS decayed, as it was officially.
    """
    return param.ndim <= 1 or name.endswith(".bias") or "token" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters only (frozen ones never reach AdamW)."""
    decay, skip = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (skip if no_decay(name, param) else decay).append(param)
    if not decay and not skip:
        raise ValueError("the model has no trainable parameters; check adapter.method")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": skip, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg_train: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg_train["weight_decay"]), lr=cfg_train["lr"])
