"""Pure-torch FPS and kNN: the fallback when no compiled kernel serves a device.

Same arithmetic as the kernels in ``csrc/`` (squared distances as ``(dx*dx + dy*dy) +
dz*dz`` in float32, elementwise ops that are never fused), so the indices are identical.
Inputs are float32, contiguous and validated by :mod:`pointclora.ops.functional`.
"""
from __future__ import annotations

import torch

FPS_INIT = 1e10  # pointnet2_ops' initial running distance
# pointnet2_ops skips points with float32 x^2+y^2+z^2 <= 1e-3 (a double). For float32 m,
# m > 1e-3 (double) <=> m >= float32(1e-3), the nearest float32 being just above 1e-3.
ORIGIN_EPS_F32 = torch.tensor(1e-3, dtype=torch.float32)
_KNN_CHUNK_ELEMENTS = 1 << 22  # distances held at once; bounds the memory of knn()


def _sqdist(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, cx, cy, cz) -> torch.Tensor:
    dx, dy, dz = x - cx, y - cy, z - cz
    return dx * dx + dy * dy + dz * dz


def furthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """Loops over the ``npoint`` picks only, vectorised over clouds and points."""
    b = xyz.shape[0]
    x, y, z = xyz.unbind(-1)
    pickable = (x * x + y * y + z * z) >= ORIGIN_EPS_F32.to(xyz.device)
    # -1 marks points that are never picked: min() keeps it, any pickable point beats it.
    dist = torch.where(pickable, FPS_INIT, -1.0).to(torch.float32)
    idx = torch.zeros(b, npoint, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    old = idx[:, 0]
    for j in range(1, npoint):
        center = xyz[rows, old].unsqueeze(-1)  # (B, 3, 1)
        dist = torch.minimum(dist, _sqdist(x, y, z, center[:, 0], center[:, 1], center[:, 2]))
        old = dist.argmax(dim=-1)  # first maximum: ties go to the lower index
        idx[:, j] = old
    return idx


def knn(ref: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by a unique int64 key ``(float bits of distance) << 32 | index``.

    Squared distances are non-negative, so their bit patterns sort like the values and the
    key orders by distance, then index, which ``topk`` cannot promise for equal values.
    """
    b, n, _ = ref.shape
    rx, ry, rz = (c.unsqueeze(1) for c in ref.unbind(-1))  # (B, 1, N)
    positions = torch.arange(n, device=ref.device)
    chunk = max(1, _KNN_CHUNK_ELEMENTS // max(1, b * n))
    dists, idxs = [], []
    for part in query.split(chunk, dim=1):
        qx, qy, qz = (c.unsqueeze(-1) for c in part.unbind(-1))  # (B, m, 1)
        d = _sqdist(rx, ry, rz, qx, qy, qz)
        key = (d.view(torch.int32).to(torch.int64) << 32) | positions
        idx = key.topk(k, dim=-1, largest=False, sorted=True).values & 0xFFFFFFFF
        dists.append(d.gather(-1, idx))
        idxs.append(idx)
    if not idxs:
        empty = query.new_empty(b, 0, k)
        return empty, empty.long()
    return torch.cat(dists, dim=1), torch.cat(idxs, dim=1)
