"""Batched point sampling and training augmentation of the official fine-tuning recipes.

Runs on the batch `(B, N, 3)` on its device, after the DataLoader, as the official runners
do. Sampling (Point-MAE `runner_finetune.py`): train/vote take FPS to
`FPS_POOL[npoints]` points (capped at N) then a random `npoints`-subset of them, so 2048
points from 2048 (ScanObjectNN) and 8192 from 8192 are a random permutation; test takes
FPS to `npoints` (nothing when N == npoints). The random subset is drawn per cloud (the
official code drew one subset for the whole batch).
"""
from __future__ import annotations

import math
import weakref

import torch

from pointclora import ops

from .common import DataError

FPS_POOL = {1024: 1200, 2048: 2400, 4096: 4800, 8192: 8192}
MODES = ("train", "test", "vote")
PROTOCOLS = {
    "A": "protocol A (Point-MAE): per-cloud, per-axis scale U(2/3, 3/2) then translation "
         "U(-0.2, 0.2)",
    "B": "protocol B (ACT/ReCon): per-cloud random rotation U(0, 2pi) about the up axis "
         "({up})",
    "none": "no augmentation",
}
AXES = {"x": 0, "y": 1, "z": 2}


def _protocol(cfg: dict) -> str:
    raw = str(cfg.get("protocol", "A"))
    key = raw.upper() if raw.upper() in ("A", "B") else raw.lower()
    if key not in PROTOCOLS:
        raise DataError(f"data.protocol must be A, B or none; got {raw!r}")
    return key


def _up_axis(cfg: dict) -> str:
    up = str(cfg.get("up_axis", "y")).lower()
    if up not in AXES:
        raise DataError(f"data.up_axis must be x, y or z; got {up!r}")
    return up


def protocol_description(cfg_data: dict) -> str:
    """One line naming the point sampling and augmentation a classification run used."""
    npoints = int(cfg_data.get("npoints", 1024))
    pool = FPS_POOL.get(npoints, npoints)
    aug = PROTOCOLS[_protocol(cfg_data)].format(up=f"{_up_axis(cfg_data)} axis up")
    return (f"{aug}; train/vote sampling: FPS to min({pool}, N) points then a random "
            f"{npoints}-subset (a permutation when N = {npoints}); test: FPS to {npoints} "
            f"(none when N = {npoints})")


def _rand(shape, device, generator):
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src).to(device)


def scale_translate(points: torch.Tensor, generator=None) -> torch.Tensor:
    """Protocol A: xyz * U(2/3, 3/2)^3 + U(-0.2, 0.2)^3, drawn per cloud."""
    B = points.shape[0]
    r = _rand((B, 2, 3), points.device, generator).to(points.dtype)
    scale = 2 / 3 + (3 / 2 - 2 / 3) * r[:, :1]
    shift = 0.4 * r[:, 1:] - 0.2
    return points * scale + shift


def rotate_up(points: torch.Tensor, up: str = "y", generator=None) -> torch.Tensor:
    """Protocol B: a random rotation about the `up` axis per cloud (row vectors times R)."""
    B = points.shape[0]
    angle = _rand((B,), points.device, generator).to(points.dtype) * (2 * math.pi)
    c, s = angle.cos(), angle.sin()
    i, j = [a for a in range(3) if a != AXES[up]]
    R = torch.zeros(B, 3, 3, dtype=points.dtype, device=points.device)
    R[:, AXES[up], AXES[up]] = 1
    R[:, i, i], R[:, j, j], R[:, i, j], R[:, j, i] = c, c, s, -s
    return points @ R


class BatchTransform:
    """Callable `(B, N, 3) -> (B, npoints, 3)`; see the module docstring.

    In vote mode the FPS pool of the last batch is reused while the same tensor comes
    back, so k views cost one FPS, as in the official voting loop.
    """

    def __init__(self, npoints: int, mode: str, protocol: str = "A", up_axis: str = "y"):
        if mode not in MODES:
            raise DataError(f"transform mode must be one of {MODES}; got {mode!r}")
        self.npoints, self.mode, self.protocol, self.up_axis = npoints, mode, protocol, up_axis
        self._pool_of = (None, None, None)  # (weakref to input, version, pool idx)

    def __repr__(self) -> str:
        return (f"BatchTransform(npoints={self.npoints}, mode={self.mode!r}, "
                f"protocol={self.protocol!r}, up_axis={self.up_axis!r})")

    def __getstate__(self):  # the vote-mode memo holds a weakref: never pickle it
        return {**self.__dict__, "_pool_of": (None, None, None)}

    def _fps(self, points: torch.Tensor, count: int) -> torch.Tensor:
        ref, version, idx = self._pool_of
        if ref is not None and ref() is points and version == points._version:
            return idx
        idx = ops.furthest_point_sample(points, count)
        if self.mode == "vote":
            self._pool_of = (weakref.ref(points), points._version, idx)
        return idx

    def sample(self, points: torch.Tensor, generator=None) -> torch.Tensor:
        B, N = points.shape[:2]
        if N < self.npoints:
            raise DataError(f"clouds have {N} points, fewer than data.npoints={self.npoints}")
        if self.mode == "test":
            if N == self.npoints:
                return points
            return ops.gather_points(points, self._fps(points, self.npoints))
        pool = min(FPS_POOL.get(self.npoints, self.npoints), N)
        pick = _rand((B, pool), points.device, generator).argsort(1)[:, : self.npoints]
        if pool < N:  # FPS to all N points would only reorder them: skip it
            pick = self._fps(points, pool).gather(1, pick)
        return ops.gather_points(points, pick)

    def augment(self, points: torch.Tensor, generator=None) -> torch.Tensor:
        if self.mode == "test" or self.protocol == "none":
            return points
        if self.protocol == "A":
            return scale_translate(points, generator)
        return rotate_up(points, self.up_axis, generator)

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise DataError(f"expected a batch of clouds (B, N, 3); got {tuple(points.shape)}")
        return self.augment(self.sample(points, generator), generator)


def build_batch_transform(cfg_data: dict, mode: str) -> BatchTransform:
    """The sampling + augmentation for `mode` (train | test | vote) of `data.*` settings."""
    return BatchTransform(int(cfg_data.get("npoints", 1024)), mode, _protocol(cfg_data),
                          _up_axis(cfg_data))
