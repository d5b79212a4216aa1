"""Which implementation serves FPS and kNN on each device, and why.

``auto`` picks, per call: pointnet2_ops for FPS on CUDA tensors when it is importable and
``POINTCLORA_USE_POINTNET2`` is not ``0``; else our compiled kernels (C++ on CPU, CUDA on
GPUs; compiled on first use, see :mod:`pointclora.ops.build`); else the pure-torch code.
``POINTCLORA_OPS_BACKEND`` changes the default of the ``backend=`` argument.
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


def pointnet2_enabled() -> bool:
    return os.environ.get("POINTCLORA_USE_POINTNET2", "1").strip().lower() not in (
        "0", "false", "no", "off")


def kernels(device_type: str) -> tuple[object | None, str]:
    """``(torch.ops namespace or None, reason)`` for our kernels on ``device_type``; the first
    call compiles or loads them. A failed build warns once and is not retried."""
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
                first = (str(err).strip().splitlines() or [""])[0][:300]
                reason = (f"{device_type} kernels unavailable ({type(err).__name__}: {first}); "
                          "using the pure-torch fallback")
                warnings.warn(f"pointclora.ops: {reason}", RuntimeWarning, stacklevel=3)
                _kernels[device_type] = (None, reason)
        return _kernels[device_type]


def _import_pointnet2() -> tuple[Callable | None, str]:
    global _pointnet2
    if _pointnet2 is None:
        try:
            from pointnet2_ops.pointnet2_utils import furthest_point_sample as fps
            _pointnet2 = (fps, "pointnet2_ops found")
        except Exception as err:  # absent, or built against another torch/CUDA
            _pointnet2 = (None, f"pointnet2_ops not importable ({type(err).__name__}: {err})")
    return _pointnet2


def pointnet2() -> tuple[Callable | None, str]:
    """``(pointnet2_ops furthest_point_sample or None, reason)`` as ``auto`` sees it."""
    if not pointnet2_enabled():
        return None, "pointnet2_ops disabled by POINTCLORA_USE_POINTNET2=0"
    return _import_pointnet2()


def _check_backend(backend: str | None) -> str:
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def fps(device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """``(name, fn(xyz, npoint) -> LongTensor)`` serving FPS for tensors on ``device``."""
    backend = _check_backend(backend)
    if device.type == "cuda" and backend in ("auto", "pointnet2"):
        fn, reason = pointnet2() if backend == "auto" else _import_pointnet2()
        if fn is None and backend == "pointnet2":
            raise RuntimeError(f"backend='pointnet2' requested but {reason}")
        if fn is not None:
            return "pointnet2", lambda xyz, npoint: fn(xyz, npoint).long()
    elif backend == "pointnet2":
        raise ValueError(f"backend='pointnet2' needs CUDA tensors, got device {device}")
    ops = _kernel_ops(device, backend)
    if ops is not None:
        return "kernels", ops.furthest_point_sample
    return "torch", torch_impl.furthest_point_sample


def knn(device: torch.device, k: int, backend: str | None = None) -> tuple[str, Callable]:
    """``(name, fn(ref, query, k) -> (dist, idx))`` serving kNN for tensors on ``device``."""
    backend = _check_backend(backend)
    if backend == "pointnet2":
        raise ValueError("backend='pointnet2' serves furthest_point_sample only, not knn")
    ops = _kernel_ops(device, backend)
    if ops is not None and (device.type == "cpu" or k <= ops.knn_max_k()):
        return "kernels", lambda ref, query, k: tuple(ops.knn(ref, query, k))
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
        fps_name, _ = fps(device, backend)
        knn_name, _ = knn(device, 1, backend)
        reasons = []
        if backend == "torch":
            reasons.append("POINTCLORA_OPS_BACKEND=torch selects the pure-torch implementation")
        else:
            if device_type == "cuda":
                reasons.append(pointnet2()[1])
            reasons.append(kernels(device_type)[1])
        info[device_type] = {"furthest_point_sample": fps_name, "knn": knn_name,
                             "reason": "; ".join(reasons)}
    info["pointnet2_ops"] = pointnet2()[1]
    info["default_backend"] = backend
    info["cache_dir"] = str(build.cache_root())
    return info
