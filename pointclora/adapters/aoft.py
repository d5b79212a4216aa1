"""AOFT: low-rank projections generated from one vector each (approximately orthogonal).

For ``q = (q0, q_bar)`` in ``R^n``,
``Q(q) = [[q0, -q_bar^T], [q_bar, I - q_bar q_bar^T / (1 + q0)]]`` is orthogonal when
``|q| = 1`` and close to orthogonal otherwise; ``AO(q)`` is its first ``r`` columns, built
in ``O(n r)`` without forming ``Q(q)``. Two forms (``nn.Linear`` layout):

- ``star`` (AOFT*): ``Delta W = AO(q_up) diag(lambda) AO(q_down)^T`` with per-rank scales
  ``lambda`` that start at zero;
- ``plain`` (LoRA+AOFT, no lambda): ``Delta W = B AO(q_down)^T``, LoRA with its down
  projection generated from one vector and ``B`` starting at zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LowRankLinear
from .registry import Method, SplitQKVOptions, choice, option, register_method

INITS = ("unit", "identity")
FORMS = ("star", "plain")
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
    """Per output slice: ``q_down`` and either ``(q_up, lambda)`` (``star``) or ``B``
    (``plain``)."""

    def __init__(self, base_layer: nn.Linear, r: int, n_slices: int = 1, init: str = "unit",
                 form: str = "star"):
        super().__init__(base_layer, n_slices)
        if init not in INITS:
            raise ValueError(f"unknown AOFT init {init!r}; valid: {', '.join(INITS)}")
        if form not in FORMS:
            raise ValueError(f"unknown AOFT form {form!r}; valid: {', '.join(FORMS)}")
        if r > min(self.in_features, self.slice_out):
            raise ValueError(
                f"AOFT rank r={r} exceeds min(in_features, out_features per slice) = "
                f"{min(self.in_features, self.slice_out)}"
            )
        self.r, self.form = r, form
        self.aoft_down = nn.Parameter(_init_vectors(n_slices, self.in_features, init))
        if form == "star":
            self.aoft_up = nn.Parameter(_init_vectors(n_slices, self.slice_out, init))
            self.aoft_scale = nn.Parameter(torch.zeros(n_slices, r))
        else:
            self.aoft_B = nn.Parameter(torch.zeros(n_slices, self.slice_out, r))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        down = ao_columns(self.aoft_down, self.r).transpose(-1, -2)
        if self.form == "plain":
            return self.aoft_B, down
        return ao_columns(self.aoft_up, self.r) * self.aoft_scale[:, None, :], down

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, form={self.form}"


@dataclass
class AOFTOptions(SplitQKVOptions):
    init: str = option("unit", choice(*INITS), "init of the generating vectors")
    form: str = option("star", choice(*FORMS),
                       "star: AOFT* with per-rank scales lambda; plain: LoRA+AOFT, no lambda")


@register_method
class AOFT(Method):
    name = "aoft"
    Options = AOFTOptions

    def wrap(self, name: str, module: nn.Linear) -> AOFTLinear:
        o = self.options
        return AOFTLinear(module, o.r, o.n_slices(name), init=o.init, form=o.form)
