"""PointGST: an adapter beside every block that tunes the patch tokens in the graph
spectral domain of the patch centres.

Geometry, once per forward pass, from the patch centres ``c (B, G, 3)`` (the input of the
module named ``centres``, Point-MAE's ``pos_embed``): the graph with weights
``A_ij = 1 / (|c_i - c_j| / m + delta_ij)`` (``m`` the cloud's smallest distance), its
normalised Laplacian ``L = I - D^-1/2 A D^-1/2`` and eigenvectors ``U`` (the graph
Fourier basis, columns by increasing frequency); the same per local group: the centres in
Morton (z-order) order cut into groups of ``local`` patches (one group when a cloud has
fewer), each with its own basis ``U_s``.

Adapter, beside block ``f``: ``y = f(x) + s up(h)`` with ``h = SiLU(down x)`` for every
token, and for the patch tokens ``z = down x_patches`` (rank ``r``) also
``h += U g_1(U^T z) + U_s g_2(U_s^T z)`` (local part per group, back in the original
order), where ``g_i(v) = v + SiLU(W_a LN_i(v) + b_a)`` share ``W_a`` (zero at the start).
``up = 0`` at the start: the model starts as the pre-trained one. Not mergeable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .api import _matches
from .blocks import BlockMethod, BlockOptions, NotMergeable, output_width
from .registry import POSITIVE, POSITIVE_INT, Check, choice, option, register_method

BASES = ("gft", "released")
MORTON_BITS = 10  # per axis: 2^30 cells, far finer than any patch spacing


def graph_basis(centres: torch.Tensor) -> torch.Tensor:
    """``centres (..., n, 3)`` -> eigenvectors ``(..., n, n)`` of the normalised Laplacian of
    the inverse-distance graph, as columns by increasing eigenvalue (float32 or wider)."""
    c = centres.float() if centres.dtype in (torch.float16, torch.bfloat16) else centres
    n = c.shape[-2]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    dist = torch.cdist(c, c)
    smallest = dist.masked_fill(eye.bool(), float("inf")).amin((-2, -1), keepdim=True)
    adjacency = 1.0 / (dist / smallest.clamp_min(torch.finfo(c.dtype).tiny) + eye)
    inv_sqrt = adjacency.sum(-1).rsqrt()
    laplacian = eye - inv_sqrt[..., :, None] * adjacency * inv_sqrt[..., None, :]
    return torch.linalg.eigh(laplacian).eigenvectors


def morton_order(centres: torch.Tensor) -> torch.Tensor:
    """Indices ``(B, G)`` sorting each cloud's centres along the z-order curve of its
    bounding box."""
    low = centres.amin(1, keepdim=True)
    span = (centres.amax(1, keepdim=True) - low).amax(-1, keepdim=True).clamp_min(1e-12)
    cells = ((centres - low) / span * (2**MORTON_BITS - 1)).round().long()
    key = torch.zeros_like(cells[..., 0])
    for bit in range(MORTON_BITS):  # over bits, not points
        for axis in range(3):
            key |= ((cells[..., axis] >> bit) & 1) << (3 * bit + 2 - axis)
    return key.argsort(dim=1)


class Spectra:
    """The bases of the current forward pass, shared by the tap and the blocks."""

    def __init__(self, local: int):
        self.local = self.group = local  # group: patches per local group in this pass
        self.basis: torch.Tensor | None = None  # (B, G, G)
        self.local_basis: torch.Tensor | None = None  # (B, G / local, local, local)
        self.order: torch.Tensor | None = None  # (B, G) z-order

    @torch.no_grad()
    def update(self, centres: torch.Tensor) -> None:
        B, G, _ = centres.shape
        self.group = min(self.local, G)  # fewer patches than local: one group
        if G % self.group:
            raise ValueError(f"pointgst local={self.local} must divide the number of patches "
                             f"{G}; set local to a divisor of model.num_group")
        with torch.autocast(centres.device.type, enabled=False):
            self.basis = graph_basis(centres)
            self.order = morton_order(centres)
            grouped = torch.gather(centres, 1, self.order[..., None].expand(-1, -1, 3))
            self.local_basis = graph_basis(grouped.reshape(B, G // self.group, self.group, 3))


class CentresTap(NotMergeable):
    """Passes the patch centres on unchanged and computes the bases from them."""

    why = "PointGST's spectral adapters depend on each input's geometry"

    def __init__(self, base_layer: nn.Module, spectra: Spectra):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "spectra", spectra)

    def forward(self, centres: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if centres.dim() != 3 or centres.shape[-1] != 3:
            raise ValueError(f"pointgst expects the patch centres (B, G, 3) as the input of its "
                             f"centres module, got {tuple(centres.shape)}")
        self.spectra.update(centres)
        return self.base_layer(centres, *args, **kwargs)


def _spectral(z: torch.Tensor, basis: torch.Tensor, norm: nn.LayerNorm, mix: nn.Linear,
              released: bool) -> torch.Tensor:
    """``U g(U^T z)`` (``released``: ``U^T g(U z)``), ``g(v) = v + SiLU(mix(norm(v)))``."""
    forward, inverse = (basis, basis.transpose(-1, -2)) if released else \
        (basis.transpose(-1, -2), basis)
    v = forward.to(z.dtype) @ z
    return inverse.to(z.dtype) @ (v + F.silu(mix(norm(v))))


class PointGSTBlock(NotMergeable):
    """A block with the spectral adapter beside it."""

    why = "the spectral adapter depends on each input's geometry and is nonlinear"

    def __init__(self, base_layer: nn.Module, spectra: Spectra, rank: int, scale: float,
                 basis: str):
        super().__init__()
        self.base_layer = base_layer
        d = output_width(base_layer)
        self.scale, self.released = scale, basis == "released"
        object.__setattr__(self, "spectra", spectra)
        self.pgst_down = nn.Linear(d, rank)
        self.pgst_up = nn.Linear(rank, d)
        self.pgst_mix = nn.Linear(rank, rank)  # W_a, shared by the global and local parts
        self.pgst_norm_global = nn.LayerNorm(rank)
        self.pgst_norm_local = nn.LayerNorm(rank)
        nn.init.xavier_uniform_(self.pgst_down.weight)
        nn.init.zeros_(self.pgst_down.bias)
        for layer in (self.pgst_up, self.pgst_mix):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spectra
        if s.basis is None:
            raise RuntimeError("pointgst: no patch centres seen in this forward pass; the "
                               "centres module must run before the blocks")
        z = self.pgst_down(x)
        (B, N, r), G = z.shape, s.basis.shape[-1]
        skip = N - G  # the patch tokens are the last G (a cls token, if any, comes first)
        if skip < 0:
            raise ValueError(f"pointgst: the block sees {N} tokens, fewer than the {G} patches "
                             "whose centres the model embedded")
        patches = z[:, skip:]
        spectral = _spectral(patches, s.basis, self.pgst_norm_global, self.pgst_mix,
                             self.released)
        index = s.order[..., None].expand(-1, -1, r)
        grouped = torch.gather(patches, 1, index).reshape(B, -1, s.group, r)
        local = _spectral(grouped, s.local_basis, self.pgst_norm_local, self.pgst_mix,
                          self.released).reshape(B, G, r)
        spectral = spectral.scatter_add(1, index, local)  # local part back in patch order
        h = F.silu(z)
        h = torch.cat((h[:, :skip], h[:, skip:] + spectral), dim=1)
        return self.scale * self.pgst_up(h)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs) + self.adapter(x)


@dataclass
class PointGSTOptions(BlockOptions):
    centres: str = option("pos_embed", Check(lambda v: isinstance(v, str) and bool(v),
                                             "a module name"),
                          "the module whose input is the patch centres (B, G, 3)")
    rank: int = option(36, POSITIVE_INT, "rank r of the spectral adapter")
    local: int = option(32, POSITIVE_INT,
                        "patches per local group (divides num_group; fewer patches: one group)")
    scale: float = option(1.0, POSITIVE, "s, multiplies the adapter's output")
    basis: str = option("gft", choice(*BASES),
                        "gft: U^T then U (the paper); released: U then U^T (the public code)")

    def bind(self, model: nn.Module) -> PointGSTOptions:
        bound = super().bind(model)
        if not any(_matches(n, [bound.centres]) for n, _ in model.named_modules() if n):
            raise ValueError(
                f"pointgst needs the patch centres (B, G, 3): centres={bound.centres!r} names no "
                f"module of {type(model).__name__}. Point backbones feed them to pos_embed; a "
                "model without 3D patch centres (an image ViT) cannot take pointgst")
        return bound


@register_method
class PointGST(BlockMethod):
    name = "pointgst"
    Options = PointGSTOptions

    def __init__(self, options: PointGSTOptions):
        super().__init__(options)
        self.spectra = Spectra(options.local)

    def targets(self) -> list[str] | str:
        blocks, centres = self.options.blocks, self.options.centres
        if isinstance(blocks, str):
            return rf"(?:{blocks})|(?:.*\.)?{re.escape(centres)}"
        return [*blocks, centres]

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        o = self.options
        if _matches(name, [o.centres]):
            return CentresTap(module, self.spectra)
        return PointGSTBlock(module, self.spectra, o.rank, o.scale, o.basis)
