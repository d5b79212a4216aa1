"""Common base of the weight-delta wrappers around a frozen ``nn.Linear``.

Every method here adds a low-rank delta ``Delta W = up @ down`` that does not depend on the
input, given by ``factors()``. While autograd records, the layer computes
``W x + b + up (down x)`` through :class:`LowRankLinearFunction`, whose backward takes the
factors' gradients from rank-sized products: autograd on ``(W + Delta W) x`` would form a dense
``d_out x d_in`` weight gradient, as costly as the frozen layer's own weight gradient in full
fine-tuning. Without autograd (evaluation) the layer computes ``(W + Delta W) x + b``, what the
merged model (``W <- W + Delta W``, the same ``delta_weight()``) computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BASE_LAYER = "base_layer"


class LowRankLinearFunction(torch.autograd.Function):
    """``y = x W^T + b + (x down^T) up^T`` slice by slice, never forming ``Delta W``.

    ``up (n, out/n, R)``, ``down (n, R, in)``. The forward keeps ``h = x down^T`` (``tokens x
    nR``, tiny) for the backward, which never forms a ``d_out x d_in`` matrix unless ``W``
    itself trains: ``grad_x = g W + (g up) down``, ``grad_up[j] = g_j^T h_j`` and
    ``grad_down[j] = (g_j up[j])^T x``. Rank-sized products are computed transposed (``(R,
    tokens)`` outputs), which BLAS runs several times faster than ``(tokens, R)`` ones.
    Against forming ``W + Delta W`` in the forward and again in the backward this saves
    50% (200 tokens) to 2% (6,304 tokens) of a ViT-B/16 qkv layer's training time
    (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, up, down):
        n, slice_out, rank = up.shape
        x2 = x.reshape(-1, weight.shape[1])
        y = F.linear(x2, weight, bias)  # under autocast: half precision, and so is the rest
        dtype = y.dtype
        up, down = up.to(dtype), down.reshape(n * rank, -1).to(dtype)
        hidden_t = down @ x2.t().to(dtype)  # h^T (nR, tokens)
        for j, h_j in enumerate(hidden_t.split(rank)):
            y[:, j * slice_out:(j + 1) * slice_out].addmm_(h_j.t(), up[j].t())
        ctx.save_for_backward(x, weight, up, down, hidden_t)  # up, down in the compute dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight, up, down, hidden_t = ctx.saved_tensors
        need_x, need_w, need_b, need_up, need_down = ctx.needs_input_grad
        dtype = grad.dtype
        n, slice_out, rank = up.shape
        g = grad.reshape(-1, weight.shape[0])
        x2 = x.reshape(-1, weight.shape[1]).to(dtype)
        g_slices = g.split(slice_out, dim=1)  # strided views, no copy
        grad_x = grad_w = grad_b = grad_up = grad_down = None
        if need_x or need_down:
            g_up_t = torch.cat([u.t() @ g_j.t() for u, g_j in zip(up, g_slices, strict=True)])
        if need_x:
            grad_x = (g @ weight.to(dtype)).addmm_(g_up_t.t(), down).view(x.shape)
        if need_w:
            grad_w = g.t() @ x2
        if need_b:
            grad_b = g.sum(0)
        if need_up:
            grad_up = torch.stack([h_j @ g_j for h_j, g_j
                                   in zip(hidden_t.split(rank), g_slices, strict=True)])
            grad_up = grad_up.transpose(1, 2)
        if need_down:
            grad_down = (g_up_t @ x2).view(n, rank, -1)
        return grad_x, grad_w, grad_b, grad_up, grad_down


class AdapterLayer(nn.Module):
    """A module an adapter method puts in place of a target: it keeps the target as
    ``base_layer`` (so state-dict keys map back to the plain model's), may contribute a
    regulariser, and folds itself back into a plain module with ``merge()``."""

    def regularization(self) -> torch.Tensor | None:
        """Weighted regulariser of this module, or None when the method has none."""
        return None

    @classmethod
    def total_regularization(cls, modules: list[AdapterLayer]) -> torch.Tensor | None:
        """Sum of ``regularization()`` over ``modules`` (all of this class); subclasses may
        compute it in fewer, larger operations."""
        terms = [t for m in modules if (t := m.regularization()) is not None]
        return torch.stack(terms).sum() if terms else None

    def merge(self) -> nn.Module:
        """The plain module computing what this one computes."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its layer")

    def unwrap(self) -> nn.Module:
        """The wrapped module as it was: the adapter dropped, not folded in."""
        return getattr(self, BASE_LAYER)


class LowRankLinear(AdapterLayer):
    """A frozen linear layer plus a learned weight delta.

    ``n_slices`` splits the output rows into equal slices that are adapted independently,
    so a fused ``qkv`` projection carries separate q, k and v modules.
    Subclasses implement ``factors()``.
    """

    def __init__(self, base_layer: nn.Linear, n_slices: int = 1):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"expected an nn.Linear to wrap, got {type(base_layer).__name__}")
        if n_slices < 1 or base_layer.out_features % n_slices:
            raise ValueError(
                f"cannot split out_features={base_layer.out_features} into {n_slices} "
                "equal slices"
            )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.n_slices = n_slices
        self.slice_out = base_layer.out_features // n_slices

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``up (n, out/n, R)`` and ``down (n, R, in)``: row block ``j`` of ``Delta W`` is
        ``up[j] @ down[j]``; ``n`` is ``n_slices``, or 1 where the slices share ``down``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``Delta W`` in ``nn.Linear`` layout ``(out_features, in_features)``."""
        up, down = self.factors()
        return (up @ down).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            up, down = self.factors()
            return LowRankLinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias,
                                               up, down)
        return self.dense_forward(x)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(W + Delta W) x + b`` through plain autograd ops: the merged model's computation,
        used when autograd does not record (evaluation gives what the merged model gives)."""
        weight = self.base_layer.weight
        return F.linear(x, weight + self.delta_weight().to(weight.dtype), self.base_layer.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the delta into the wrapped layer and return that layer."""
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"n_slices={self.n_slices}"


def low_rank_pair(n: int, r: int, d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``A (n, r, d_in)`` Kaiming-uniform as in LoRA and ``B (n, d_out, r)`` zero: B A = 0."""
    a = torch.empty(n, r, d_in)
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, d_in) matrix
    nn.init.uniform_(a, -bound, bound)
    return nn.Parameter(a), nn.Parameter(torch.zeros(n, d_out, r))
