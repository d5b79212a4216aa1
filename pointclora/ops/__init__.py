"""Grouping primitives: farthest point sampling, k nearest neighbours, gathering.

Backends (see docs/ops.md): pointnet2_ops for FPS on CUDA when importable, our C++/CUDA
kernels compiled on first use, and a pure-torch fallback; all return the same indices.
"""
from .backends import backend_info
from .functional import furthest_point_sample, gather_points, knn

__all__ = ["backend_info", "furthest_point_sample", "gather_points", "knn"]
