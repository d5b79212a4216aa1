"""Point ops: farthest point sampling, k nearest neighbours, gathering.

Provisional pure-torch implementation; replaced by the backend dispatcher.
"""
import torch


def furthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    B, N, _ = xyz.shape
    xyz = xyz.float()
    idx = torch.zeros(B, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((B, N), 1e10, device=xyz.device)
    valid = (xyz * xyz).sum(-1) > 1e-3
    far = torch.zeros(B, dtype=torch.long, device=xyz.device)
    ar = torch.arange(B, device=xyz.device)
    for i in range(1, npoint):
        c = xyz[ar, far].unsqueeze(1)
        d = ((xyz - c) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = torch.where(valid, dist, torch.full_like(dist, -1.0)).argmax(-1)
        idx[:, i] = far
    return idx


def knn(ref: torch.Tensor, query: torch.Tensor, k: int):
    d = torch.cdist(query.float(), ref.float()) ** 2
    dist, idx = d.topk(k, dim=-1, largest=False, sorted=True)
    return dist, idx


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B = points.shape[0]
    flat = idx.reshape(B, -1)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.reshape(*idx.shape, points.shape[-1])
