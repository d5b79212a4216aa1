"""The official per-epoch warm-up + cosine learning rate, on today's torch.

Point-MAE and Point-BERT built timm 0.4.5's `CosineLRScheduler(t_initial=epochs,
warmup_t=warmup, warmup_lr_init=warmup_lr, lr_min=min_lr)` and called `step(epoch)` once
after each epoch. The lr used during epoch `e` is therefore the scheduler's value at
`e - 1` (and its initial value at `e = 0`), so epochs 0 and 1 both run at `warmup_lr` and
the peak is reached at epoch `warmup + 1`. That call no longer works on timm >= 0.6,
hence this closed form.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def cosine_lr(t: float, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float,
              min_lr: float) -> float:
    """timm 0.4.5 `CosineLRScheduler` value at step `t` (no cycles, no warm-up prefix)."""
    if t < warmup_epochs:
        return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def official_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float,
                min_lr: float) -> float:
    """The lr the official loop used during `epoch` (0-based): one epoch behind `cosine_lr`."""
    return cosine_lr(max(epoch - 1, 0), lr, epochs, warmup_epochs, warmup_lr, min_lr)


class OfficialCosineLR(LRScheduler):
    """Per-epoch scheduler: call `step()` once after each epoch, like the official loop.

    Each parameter group peaks at its own initial lr; warm-up start and floor are shared.
    """

    def __init__(self, optimizer: Optimizer, epochs: int, warmup_epochs: int,
                 warmup_lr: float, min_lr: float, last_epoch: int = -1):
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            official_lr(self.last_epoch, base, self.epochs, self.warmup_epochs,
                        self.warmup_lr, self.min_lr)
            for base in self.base_lrs
        ]


def build_scheduler(optimizer: Optimizer, cfg_train: dict) -> OfficialCosineLR:
    return OfficialCosineLR(optimizer, cfg_train["epochs"], cfg_train["warmup_epochs"],
                            cfg_train["warmup_lr"], cfg_train["min_lr"])
