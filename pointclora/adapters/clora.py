"""CLoRA: low-rank modules built from shared base spaces, with the SADE regulariser.

Row-vector convention (``y = x W``): the bank holds ``p`` down spaces ``D_h (d_in, r)``
per input size and ``p`` up spaces ``U_h (r, d_out)`` per output size, shared by every
low-rank module (LRM). LRM ``j`` owns ``Q_h^j (r, r)`` and
``Delta W_j = alpha sum_h D_h Q_h^j U_h`` (rank up to ``p r``). SADE penalises the similarity
of the ``p`` parts ``A_h = D_h Q_h^j U_h`` of each LRM, computed from ``r x r`` Gram
matrices (``O(p^2 r^2 d)``) instead of the ``d x d`` products.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LowRankLinear
from .registry import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Method,
    SplitQKVOptions,
    choice,
    option,
    register_method,
)

SIMILARITIES = ("cross_gram", "cosine", "output_cov")
INITS = ("orthonormal", "normal")


def _orthonormal_spaces(p: int, d: int, r: int) -> torch.Tensor:
    """``(p, d, r)``, orthonormal columns; also orthogonal across ``h`` when ``p r <= d``."""
    if p * r <= d:
        q = torch.linalg.qr(torch.randn(d, p * r)).Q
        return q.reshape(d, p, r).permute(1, 0, 2).contiguous()
    return torch.linalg.qr(torch.randn(p, d, r)).Q


class CLoRABank(nn.Module):
    """The shared spaces, registered once on the model (``model.clora_bank``)."""

    def __init__(self, p: int, r: int, init: str = "orthonormal"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown CLoRA init {init!r}; valid: {', '.join(INITS)}")
        self.p, self.r, self.init = p, r, init
        self.down = nn.ParameterDict()  # key str(d_in): (p, d_in, r)
        self.up = nn.ParameterDict()  # key str(d_out): (p, r, d_out)

    def _new(self, d: int) -> torch.Tensor:
        if self.r > d:
            raise ValueError(f"CLoRA rank r={self.r} exceeds the layer size {d}")
        if self.init == "orthonormal":
            return _orthonormal_spaces(self.p, d, self.r)
        return torch.randn(self.p, d, self.r) / d**0.5

    def spaces(self, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``D (p, d_in, r)`` and ``U (p, r, d_out)``, created on first request."""
        if str(d_in) not in self.down:
            self.down[str(d_in)] = nn.Parameter(self._new(d_in))
        if str(d_out) not in self.up:
            self.up[str(d_out)] = nn.Parameter(self._new(d_out).transpose(1, 2).contiguous())
        return self.down[str(d_in)], self.up[str(d_out)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: containers that call every child (``nn.Sequential``) pass through."""
        return x


def sade(
    down: torch.Tensor,
    up: torch.Tensor,
    q: torch.Tensor,
    similarity: str = "cross_gram",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Sum over LRMs ``j`` and pairs ``h != k`` of ``sim(A_h^j, A_k^j)``.

    ``down (p, d_in, r)``, ``up (p, r, d_out)``, ``q (m, p, r, r)``.
    ``cross_gram``: ``||A_h A_k^T||_F^2 / (||A_h||_F^2 ||A_k||_F^2 + eps)``;
    ``output_cov``: ``||A_h^T A_k||_F^2 / (...)``, the outputs' cross-covariance;
    ``cosine``: ``<A_h, A_k>_F^2 / (||A_h||_F^2 ||A_k||_F^2 + eps)``.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(
            f"unknown SADE similarity {similarity!r}; valid: {', '.join(SIMILARITIES)}"
        )
    p = down.shape[0]
    gd = torch.einsum("hir,kis->hkrs", down, down)  # D_h^T D_k
    gu = torch.einsum("hro,kso->hkrs", up, up)  # U_h U_k^T
    # <A_h, A_k>_F = <Q_h, GD_hk Q_k GU_kh>_F, indexed [j, h, k]
    inner = (q[:, :, None] * (gd[None] @ q[:, None] @ gu.transpose(0, 1)[None])).sum((-2, -1))
    sq_norm = inner.diagonal(dim1=1, dim2=2)
    denom = sq_norm[:, :, None] * sq_norm[:, None, :] + eps
    if similarity == "cosine":
        num = inner.square()
    elif similarity == "cross_gram":
        # A_h A_k^T = D_h M D_k^T, M = Q_h GU_hk Q_k^T
        num = _sandwich_sq_norm(gd, q[:, :, None] @ gu[None] @ q[:, None].transpose(-1, -2))
    else:
        # A_h^T A_k = U_h^T N U_k, N = Q_h^T GD_hk Q_k
        num = _sandwich_sq_norm(gu, q[:, :, None].transpose(-1, -2) @ gd[None] @ q[:, None])
    off_diag = ~torch.eye(p, dtype=torch.bool, device=q.device)
    return (num / denom)[:, off_diag].sum()


def _sandwich_sq_norm(gram: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``||X_h M_hk X_k^T||_F^2 = <G_hh M_hk G_kk, M_hk>_F`` with ``G_hk = X_h^T X_k``
    (``gram (p, p, r, r)``, ``m (j, p, p, r, r)``): no product of the layer's size."""
    g = gram.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # G_hh, (p, r, r)
    return ((g[None, :, None] @ m @ g[None, None, :]) * m).sum((-2, -1))


class CLoRALinear(LowRankLinear):
    """One LRM per output slice, each owning ``p`` matrices ``Q_h (r, r)``, zero at start."""

    def __init__(
        self,
        base_layer: nn.Linear,
        bank: CLoRABank,
        n_slices: int = 1,
        sade_weight: float = 0.0,
        sade_similarity: str = "cross_gram",
        sade_eps: float = 1e-8,
        alpha: float = 1.0,
    ):
        super().__init__(base_layer, n_slices)
        if sade_similarity not in SIMILARITIES:
            raise ValueError(
                f"unknown SADE similarity {sade_similarity!r}; valid: {', '.join(SIMILARITIES)}"
            )
        bank.spaces(self.in_features, self.slice_out)
        # A plain reference: the bank is registered (and counted) once, on the model.
        object.__setattr__(self, "bank", bank)
        self.clora_Q = nn.Parameter(torch.zeros(n_slices, bank.p, bank.r, bank.r))
        self.sade_weight, self.sade_similarity, self.sade_eps = (
            sade_weight, sade_similarity, sade_eps
        )
        self.alpha = alpha

    def _spaces(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bank.down[str(self.in_features)], self.bank.up[str(self.slice_out)]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair for the whole layer, the slices stacked in ``up``: ``down = [D_1 .. D_p]^T``
        and ``up_j = alpha (Q^j U)^T`` with ``Q^j = diag(Q_1^j .. Q_p^j)``, ``U = [U_1; ..;
        U_p]``. The slices share ``D``, so a fused qkv costs one rank-``pr`` product ``x D``,
        not one per slice (``(D Q^j)^T`` as the down factor of each slice: 3x the
        down-projection work, and 3 products instead of one)."""
        down, up = self._spaces()
        p, r = self.bank.p, self.bank.r
        mixed = self.clora_Q @ up  # (n, p, r, d_out / n): Q_h^j U_h
        if self.alpha != 1:
            mixed = self.alpha * mixed
        up = mixed.permute(0, 3, 1, 2).reshape(1, self.out_features, p * r)
        return up, down.transpose(1, 2).reshape(1, p * r, self.in_features)

    def regularization(self) -> torch.Tensor | None:
        if self.sade_weight == 0:
            return None
        down, up = self._spaces()
        return self.sade_weight * sade(down, up, self.clora_Q, self.sade_similarity, self.sade_eps)

    @classmethod
    def total_regularization(cls, modules: list[CLoRALinear]) -> torch.Tensor | None:
        """One ``sade`` call per shared bank space pair and setting: the Gram matrices of the
        spaces are formed once, not once per module (about 10x less time for 24 modules)."""
        groups: dict[tuple, list[CLoRALinear]] = {}
        for m in modules:
            if m.sade_weight:
                key = (m.in_features, m.slice_out, id(m.bank), m.sade_weight, m.sade_similarity,
                       m.sade_eps)
                groups.setdefault(key, []).append(m)
        terms = []
        for group in groups.values():
            first = group[0]
            down, up = first._spaces()
            q = torch.cat([m.clora_Q for m in group])
            terms.append(first.sade_weight * sade(down, up, q, first.sade_similarity,
                                                  first.sade_eps))
        return torch.stack(terms).sum() if terms else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.bank.p}, r={self.bank.r}, alpha={self.alpha}"


@dataclass
class CLoRAOptions(SplitQKVOptions):
    p: int = option(4, POSITIVE_INT, "number of shared spaces")
    init: str = option("orthonormal", choice(*INITS), "init of the shared spaces")
    sade_weight: float = option(1e-3, NON_NEGATIVE, "lambda, weight of SADE in the loss")
    sade_similarity: str = option("cross_gram", choice(*SIMILARITIES),
                                  "the similarity SADE penalises")
    sade_eps: float = option(1e-8, POSITIVE, "stabiliser of the SADE denominator")
    alpha: float = option(1.0, POSITIVE, "scale of Delta W (direct, not divided by r)")


@register_method
class CLoRA(Method):
    """Every wrapper draws its spaces from one bank, registered as ``model.clora_bank``."""

    name = "clora"
    Options = CLoRAOptions

    def __init__(self, options: CLoRAOptions):
        super().__init__(options)
        self.bank = CLoRABank(options.p, options.r, init=options.init)

    def shared_modules(self) -> dict[str, nn.Module]:
        return {"clora_bank": self.bank}

    def wrap(self, name: str, module: nn.Linear) -> CLoRALinear:
        o = self.options
        return CLoRALinear(module, self.bank, o.n_slices(name), o.sade_weight,
                           o.sade_similarity, o.sade_eps, o.alpha)
