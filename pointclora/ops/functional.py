"""Public grouping primitives: input checks, float32 conversion, backend dispatch.

FPS and kNN are registered as torch custom operators (``torch.ops.pointclora.*``) with fake
implementations, so ``torch.compile`` traces through them (``fullgraph=True`` works): the
backend is chosen, and coordinates are checked for NaN/inf, when the operator runs.
"""
from __future__ import annotations

import numbers

import torch

from . import backends


def _cloud(name: str, t, what: str = "(B, N, 3)") -> torch.Tensor:
    """Float32, contiguous, detached copy of a validated point cloud batch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.detach().to(torch.float32).contiguous()


def _check_finite(**clouds: torch.Tensor) -> None:
    """One device synchronisation for all ``clouds``; the error names the first bad point."""
    ok = None
    for t in clouds.values():
        flag = torch.isfinite(t).all()
        ok = flag if ok is None else ok & flag
    if bool(ok):
        return
    for name, t in clouds.items():
        finite = torch.isfinite(t).all(dim=-1)
        if not bool(finite.all()):
            b, i = (int(v) for v in (~finite).nonzero()[0])
            raise ValueError(f"{name} of shape {tuple(t.shape)} has NaN or inf coordinates "
                             f"(first at batch {b}, point {i}); drop or repair those points "
                             "first")


def _count(name: str, value, limit: int, limit_name: str, shape: tuple) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value} (shape {shape})")
    if value > limit:
        raise ValueError(f"{name}={value} exceeds the {limit} points of {limit_name} "
                         f"(shape {shape}); use {name} <= {limit}")
    return value


def _traced(t: torch.Tensor) -> bool:
    """Whether a tracer (torch.compile, export, fake or meta tensors) sees this call: then
    the custom operator is called, else its implementation directly, which saves the
    operator's dispatch cost (about 0.1-0.3 ms a call, more than a kernel at these sizes)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor or t.is_meta


def _fps(xyz: torch.Tensor, npoint: int, backend: str) -> torch.Tensor:
    _check_finite(xyz=xyz)
    if xyz.shape[0] == 0:
        return torch.empty(0, npoint, dtype=torch.long, device=xyz.device)
    _, fn = backends.fps(xyz.device, backend)
    return fn(xyz, npoint)


def _knn(ref: torch.Tensor, query: torch.Tensor, k: int,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_finite(ref=ref, query=query)
    b, m = query.shape[:2]
    if b == 0 or m == 0:
        return (query.new_empty(b, m, k),
                torch.empty(b, m, k, dtype=torch.long, device=query.device))
    _, fn = backends.knn(ref.device, k, backend)
    return tuple(fn(ref, query, k))


_fps_op = torch.library.custom_op("pointclora::furthest_point_sample", _fps, mutates_args=())
_knn_op = torch.library.custom_op("pointclora::knn", _knn, mutates_args=())


@_fps_op.register_fake
def _(xyz: torch.Tensor, npoint: int, backend: str) -> torch.Tensor:
    return xyz.new_empty(xyz.shape[0], npoint, dtype=torch.long)


@_knn_op.register_fake
def _(ref: torch.Tensor, query: torch.Tensor, k: int,
      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    b, m = query.shape[:2]
    return query.new_empty(b, m, k), query.new_empty(b, m, k, dtype=torch.long)


def furthest_point_sample(xyz: torch.Tensor, npoint: int, *,
                          backend: str | None = None) -> torch.Tensor:
    """Farthest point sampling with pointnet2_ops semantics, so centers match the official
    Point-MAE/Point-BERT pipeline.

    Starts at index 0; each next pick maximises the running squared distance (starting at
    1e10) to the picks so far, ties to the lower index; points with x^2+y^2+z^2 <= 1e-3
    are never picked after the first (all-origin clouds repeat index 0). Computed in
    float32 whatever the input dtype.

    Args:
        xyz: (B, N, 3) floating-point coordinates, finite.
        npoint: number of picks, 1 <= npoint <= N.
        backend: "auto" (default, or ``$POINTCLORA_OPS_BACKEND``: our compiled kernels,
            else pure torch), "kernels" (raise if they cannot be built), "torch" or
            "pointnet2" (pointnet2_ops, CUDA only).

    Returns:
        LongTensor (B, npoint) of indices into N.
    """
    xyz = _cloud("xyz", xyz)
    npoint = _count("npoint", npoint, xyz.shape[1], "xyz", tuple(xyz.shape))
    return (_fps_op if _traced(xyz) else _fps)(xyz, npoint, backends.resolve(backend))


def knn(ref: torch.Tensor, query: torch.Tensor, k: int, *,
        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest points of ``ref`` to each point of ``query``.

    Args:
        ref: (B, N, 3) floating-point reference points.
        query: (B, M, 3) query points on the same device.
        k: 1 <= k <= N.
        backend: "auto" (default, or ``$POINTCLORA_OPS_BACKEND``), "kernels" or "torch".

    Returns:
        ``(dist, idx)``, both (B, M, k) and sorted by increasing distance, ties to the lower
        index: ``dist`` is the *squared* Euclidean distance in float32 (take ``sqrt`` for
        KNN_CUDA-style distances), ``idx`` a LongTensor of indices into N.
    """
    ref = _cloud("ref", ref, "(B, N, 3)")
    query = _cloud("query", query, "(B, M, 3)")
    if ref.device != query.device:
        raise ValueError(f"ref is on {ref.device} but query is on {query.device}")
    if ref.shape[0] != query.shape[0]:
        raise ValueError(f"ref {tuple(ref.shape)} and query {tuple(query.shape)} have "
                         "different batch sizes")
    k = _count("k", k, ref.shape[1], "ref", tuple(ref.shape))
    if backend == "pointnet2":  # explicit only: from the environment it means "auto" here
        raise ValueError("backend='pointnet2' serves furthest_point_sample only, not knn")
    return (_knn_op if _traced(ref) else _knn)(ref, query, k, backends.resolve(backend))


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, ...] = points[b, idx[b, ...]]``; differentiable with respect to ``points``.

    Args:
        points: (B, N, C) tensor of any dtype.
        idx: integer tensor (B, ...) with values in [0, N), e.g. FPS (B, G) or kNN (B, G, k).

    Returns:
        (B, ..., C) tensor of ``points.dtype``.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 3:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"points must be a tensor of shape (B, N, C), got {shape}")
    if not isinstance(idx, torch.Tensor) or idx.dim() < 1:
        raise ValueError(f"idx must be an integer tensor of shape (B, ...), got {idx!r}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    b, n, c = points.shape
    if idx.shape[0] != b:
        raise ValueError(f"idx of shape {tuple(idx.shape)} does not match the batch size of "
                         f"points {tuple(points.shape)}")
    if idx.device != points.device:
        raise ValueError(f"idx is on {idx.device} but points are on {points.device}")
    if idx.numel() and not torch.compiler.is_compiling():  # compiled: torch.gather checks
        low, high = (int(v) for v in torch.aminmax(idx))
        if low < 0 or high >= n:
            raise ValueError(f"idx values must lie in [0, {n}) for points {tuple(points.shape)}, "
                             f"got range [{low}, {high}]")
    flat = idx.reshape(b, -1, 1).long().expand(-1, -1, c)
    return points.gather(1, flat).reshape(*idx.shape, c)
