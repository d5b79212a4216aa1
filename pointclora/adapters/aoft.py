"""AOFT: low-rank projections generated from one vector each (approximately orthogonal).

For ``q = (q0, q_bar)`` in ``R^n``,
``Q(q) = [[q0, -q_bar^T], [q_bar, I - q_bar q_bar^T / (1 + q0)]]`` is orthogonal when
``|q| = 1`` and close to orthogonal otherwise; ``AO(q)`` is its first ``r`` columns, built
in ``O(n r)`` without forming ``Q(q)``. ``Delta W = AO(q_up) diag(lambda) AO(q_down)^T``
(``nn.Linear`` layout) with per-rank scales ``lambda`` that start at zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LowRankLinear

INITS = ("unit", "identity")
# 1 + q0 is clamped from below in the denominator; both inits start with q0 >= 0.
MIN_DENOM = 1e-3


def ao_columns(q: torch.Tensor, r: int) -> torch.Tensor:
    """First ``r`` columns of ``Q(q)`` for ``q (..., n)``: ``(..., n, r)``."""
    n = q.shape[-1]
    if not 1 <= r <= n:
        raise ValueError(f"AOFT rank r={r} must be between 1 and the vector length {n}")
    q0, q_bar = q[..., :1], q[..., 1:]
    denom = (1 + q0).clamp_min(MIN_DENOM)
    head = q_bar[..., : r - 1]
    top = torch.cat([q0, -head], dim=-1)[..., None, :]  # row 0
    eye = torch.eye(n - 1, r - 1, dtype=q.dtype, device=q.device)
    rest = eye - q_bar[..., :, None] * (head / denom)[..., None, :]
    lower = torch.cat([q_bar[..., :, None], rest], dim=-1)  # rows 1..n-1
    return torch.cat([top, lower], dim=-2)


def _init_vectors(n_slices: int, n: int, init: str) -> torch.Tensor:
    if init == "identity":
        return torch.eye(1, n).expand(n_slices, n).clone()
    v = torch.nn.functional.normalize(torch.randn(n_slices, n), dim=-1)
    v[:, 0] = v[:, 0].abs()
    return v


class AOFTLinear(LowRankLinear):
    """One ``(q_down, q_up, lambda)`` triple per output slice."""

    def __init__(self, base_layer: nn.Linear, r: int, n_slices: int = 1, init: str = "unit"):
        super().__init__(base_layer, n_slices)
        if init not in INITS:
            raise ValueError(f"unknown AOFT init {init!r}; valid: {', '.join(INITS)}")
        if r > min(self.in_features, self.slice_out):
            raise ValueError(
                f"AOFT rank r={r} exceeds min(in_features, out_features per slice) = "
                f"{min(self.in_features, self.slice_out)}"
            )
        self.r = r
        self.aoft_down = nn.Parameter(_init_vectors(n_slices, self.in_features, init))
        self.aoft_up = nn.Parameter(_init_vectors(n_slices, self.slice_out, init))
        self.aoft_scale = nn.Parameter(torch.zeros(n_slices, r))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up = ao_columns(self.aoft_up, self.r) * self.aoft_scale[:, None, :]
        return up, ao_columns(self.aoft_down, self.r).transpose(-1, -2)
