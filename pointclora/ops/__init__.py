"""Grouping primitives: farthest point sampling, k nearest neighbours, gathering.

Backends (see docs/ops.md): our C++/CUDA kernels compiled on first use, a pure-torch
fallback (both return the same indices) and, on request, pointnet2_ops for FPS. FPS and
kNN are torch custom operators, so ``torch.compile`` traces them.
"""
from .backends import backend_info
from .functional import furthest_point_sample, gather_points, knn

__all__ = ["backend_info", "furthest_point_sample", "gather_points", "knn"]
