"""Transformer layers of the official Point-MAE / Point-BERT encoders, under their key names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: timm's ``DropPath`` (same per-sample masks, same random stream).

    Blocks do not call it on the branch; they take ``mask()`` and fuse it with the residual
    sum in one ``addcmul`` (no separate product tensor forward or backward). Implemented here
    rather than imported from timm, whose import costs seconds.
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``Bernoulli(keep) / keep`` of shape ``(B, 1, ..., 1)``."""
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return x
        return x * self.mask(x)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused, bias-free ``qkv`` projection.

    ``qkv`` and ``proj`` are always called as modules so that adapters can replace them with
    wrappers. The product runs in ``scaled_dot_product_attention`` with the official scale
    ``head_dim ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network (``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block.

    Sub-modules are registered in the official order (norm1, norm2, mlp, attn) so that
    ``state_dict()`` lists keys exactly as the official checkpoints do.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # torch default eps 1e-5, as in the official code
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.attn(self.norm1(x)))
        return self._residual(x, self.mlp(self.norm2(x)))

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + drop_path(branch)``, one fused op when a path may be dropped."""
        if self.training and getattr(self.drop_path, "drop_prob", 0) > 0:
            return torch.addcmul(x, branch, self.drop_path.mask(branch))
        return x + branch


class TransformerEncoder(nn.Module):
    """Stack of blocks; the positional embedding is added again before every block."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path_rate: float):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # as official
        self.blocks = nn.ModuleList(Block(dim, num_heads, drop_path=rate) for rate in rates)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x
