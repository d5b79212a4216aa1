"""Which implementation serves FPS and kNN on each device, and why.

``auto`` picks, per call, our compiled kernels (C++ on CPU, CUDA on GPUs; compiled on first
use, see :mod:`pointclora.ops.build`), else the pure-torch code. pointnet2_ops serves FPS
only when asked for by name (``backend="pointnet2"``): it breaks ties by CUDA thread rather
than by index, is often built without the user's GPU architecture and exits the process
on a launch error. ``POINTCLORA_OPS_BACKEND`` changes the default of the ``backend=``
argument.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

from . import build, torch_impl

BACKENDS = ("auto", "pointnet2", "kernels", "torch")
_lock = threading.Lock()
_kernels: dict[str, tuple[object | None, str]] = {}
_pointnet2: tuple[Callable | None, str] | None = None


def default_backend() -> str:
    backend = os.environ.get("POINTCLORA_OPS_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"POINTCLORA_OPS_BACKEND={backend!r} is not one of {BACKENDS}")
    return backend


def kernels(device_type: str) -> tuple[object | None, str]:
    """``(torch.ops namespace or None, reason)`` for our kernels on ``device_type``; the first
    call compiles or loads them. A failed build warns once per process and is recorded in
    the build cache, so other processes do not compile it again (see build.build)."""
    if device_type not in build.KINDS:
        return None, f"no compiled kernels for {device_type!r} devices"
    if device_type == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA device visible"
    with _lock:
        if device_type not in _kernels:
            try:
                path = build.build(device_type)
                ops = getattr(torch.ops, f"pointclora_{device_type}")
                where = f"cached in {path.parent}"
                if device_type == "cpu":
                    reason = (f"cpu C++ kernels compiled ({torch.get_num_threads()} "
                              f"intra-op threads), {where}")
                else:
                    reason = f"cuda kernels compiled for arch {build.visible_cuda_arch()}, {where}"
                _kernels[device_type] = (ops, reason)
            except Exception as err:  # compiler, ninja, headers, loader: all fall back
                first = (str(err).strip().splitlines() or [""])[0][:600]
                reason = (f"{device_type} kernels unavailable ({type(err).__name__}: {first}); "
                          "using the pure-torch fallback")
                warnings.warn(f"pointclora.ops: {reason}", RuntimeWarning, stacklevel=3)
                _kernels[device_type] = (None, reason)
        return _kernels[device_type]


def pointnet2() -> tuple[Callable | None, str]:
    """``(pointnet2_ops furthest_point_sample or None, reason)``."""
    global _pointnet2
    if _pointnet2 is None:
        try:
            from pointnet2_ops.pointnet2_utils import furthest_point_sample as fps
            _pointnet2 = (fps, "pointnet2_ops importable (used only with backend='pointnet2')")
        except Exception as err:  # absent, or built against another torch/CUDA
            _pointnet2 = (None, f"pointnet2_ops not importable ({type(err).__name__}: {err})")
    return _pointnet2


def resolve(backend: str | None) -> str:
    """``backend``, or the default from the environment when None; validated."""
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def fps(device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """``(name, fn(xyz, npoint) -> LongTensor)`` serving FPS for tensors on ``device``."""
    backend = resolve(backend)
    if backend == "pointnet2":
        if device.type != "cuda":
            raise ValueError(f"backend='pointnet2' needs CUDA tensors, got device {device}")
        fn, reason = pointnet2()
        if fn is None:
            raise RuntimeError(f"backend='pointnet2' requested but {reason}")

        def pointnet2_fps(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
            # pointnet2_ops launches on the current device: make it the tensor's.
            with torch.cuda.device(xyz.device):
                return fn(xyz, npoint).long()

        return "pointnet2", pointnet2_fps
    ops = _kernel_ops(device, backend)
    if ops is not None:
        return "kernels", ops.furthest_point_sample
    return "torch", torch_impl.furthest_point_sample


def knn(device: torch.device, k: int, backend: str | None = None) -> tuple[str, Callable]:
    """``(name, fn(ref, query, k) -> (dist, idx))`` serving kNN for tensors on ``device``.
    ``"pointnet2"`` (which has no kNN) means ``"auto"`` here; :func:`pointclora.ops.knn`
    rejects it when passed explicitly."""
    backend = resolve(backend)
    if backend == "pointnet2":
        backend = "auto"
    ops = _kernel_ops(device, backend)
    if ops is not None and (device.type == "cpu" or k <= ops.knn_max_k()):
        return "kernels", ops.knn
    if ops is not None and backend == "kernels":
        raise ValueError(f"backend='kernels' on CUDA serves k <= {ops.knn_max_k()}, got k={k}")
    return "torch", torch_impl.knn


def _kernel_ops(device: torch.device, backend: str):
    if backend == "torch":
        return None
    ops, reason = kernels(device.type)
    if ops is None and backend == "kernels":
        raise RuntimeError(f"backend='kernels' requested but {reason}")
    return ops


def backend_info() -> dict:
    """Which backend serves each device and why, e.g.::

        {"cpu": {"furthest_point_sample": "kernels", "knn": "kernels",
                 "reason": "cpu C++ kernels compiled (2 intra-op threads), cached in ..."},
         "cuda": {"furthest_point_sample": None, "knn": None,
                  "reason": "no CUDA device visible"},
         "pointnet2_ops": "pointnet2_ops not importable (...)", "default_backend": "auto",
         "cache_dir": "/home/me/.cache/pointclora"}

    Compiles the kernels for the visible devices if that has not happened yet.
    """
    backend = default_backend()
    info: dict = {}
    for device_type in build.KINDS:
        if device_type == "cuda" and not torch.cuda.is_available():
            info["cuda"] = {"furthest_point_sample": None, "knn": None,
                            "reason": "no CUDA device visible (torch.cuda.is_available() is False)"}
            continue
        device = torch.device(device_type)
        fps_backend = "auto" if backend == "pointnet2" and device_type == "cpu" else backend
        knn_name, _ = knn(device, 1)
        if backend == "torch":
            reason = "POINTCLORA_OPS_BACKEND=torch selects the pure-torch implementation"
        else:
            reason = kernels(device_type)[1]
        try:
            fps_name, _ = fps(device, fps_backend)
        except RuntimeError as err:  # POINTCLORA_OPS_BACKEND=pointnet2 without pointnet2_ops
            fps_name, reason = None, f"{reason}; furthest_point_sample: {err}"
        info[device_type] = {"furthest_point_sample": fps_name, "knn": knn_name,
                             "reason": reason}
    info["pointnet2_ops"] = pointnet2()[1]
    info["default_backend"] = backend
    info["cache_dir"] = str(build.cache_root())
    return info
