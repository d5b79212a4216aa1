"""Shared pieces of the dataset loaders: errors, validation, normalisation, safe file I/O.

Every loader reports bad data through `DataError` naming the file and the sample, so a
broken download is found at load time instead of as a NaN loss hours later.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

README = "datasets/README.md"


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says where and why."""


def missing(what: str, path: Path | str, layout: str) -> DataError:
    """The error for an absent root or file: shows the expected layout and the README."""
    return DataError(f"{what} not found: {path}\nExpected layout:\n{layout.rstrip()}\n"
                     f"See {README} for where to get the files.")


def first_indices(mask: torch.Tensor | np.ndarray, limit: int = 5) -> str:
    """'3, 17 and 2 more' for the True positions of a 1-D mask."""
    idx = np.flatnonzero(np.asarray(mask))
    text = ", ".join(str(i) for i in idx[:limit])
    return text + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


def check_points(points: torch.Tensor, source: str) -> None:
    """Reject a stack (S, N, 3) with NaN/inf coordinates, or clouds without extent (all zeros,
    or one point repeated: no shape to learn, and normalisation would divide by zero)."""
    bad = ~torch.isfinite(points).flatten(1).all(1)
    if bad.any():
        raise DataError(f"{source}: NaN or inf coordinates in sample(s) {first_indices(bad)}")
    flat = (points.amax(1) - points.amin(1)).amax(-1) == 0 if points.shape[1] else bad
    if flat.any():
        raise DataError(f"{source}: sample(s) {first_indices(flat)} hold only zeros or one "
                        "repeated point (no shape); remove them or re-export the data")


def as_labels(labels, source: str, num_classes: int | None = None) -> torch.Tensor:
    """Labels (n,) or (n, 1), integer-valued (any dtype) -> int64 (n,), range-checked."""
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{source}: labels must have shape (n,) or (n, 1), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{source}: labels must be numbers, got dtype {arr.dtype}")
        frac = ~np.isfinite(arr) | (arr != np.round(arr))
        if frac.any():
            raise DataError(f"{source}: non-integer label in sample(s) {first_indices(frac)}")
    out = torch.from_numpy(arr.astype(np.int64))
    if num_classes is not None:
        bad = (out < 0) | (out >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad.numpy())[0])
            raise DataError(f"{source}: label {int(out[i])} of sample {i} is outside "
                            f"0..{num_classes - 1} (samples {first_indices(bad.numpy())})")
    return out


def xyz_of(array, source: str, index: int) -> np.ndarray:
    """The xyz columns of one sample (N, C>=3), with a precise error for anything else."""
    arr = np.asarray(array)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise DataError(f"{source}: sample {index} has shape {arr.shape}; "
                        "expected (N, 3) or (N, 6) points (xyz first)")
    return arr[:, :3]


def stack_xyz(arrays: Sequence, source: str) -> torch.Tensor:
    """Per-sample arrays (N, C>=3) -> float32 (S, N, 3); every sample must have N rows."""
    xyz = [xyz_of(a, source, i) for i, a in enumerate(arrays)]
    if not xyz:
        raise DataError(f"{source}: holds no samples")
    counts = np.array([len(a) for a in xyz])
    if (counts != counts[0]).any():
        i = int(np.flatnonzero(counts != counts[0])[0])
        raise DataError(f"{source}: sample {i} has {counts[i]} points, sample 0 has "
                        f"{counts[0]}; all samples need the same count")
    return torch.from_numpy(np.stack(xyz).astype(np.float32, copy=False))


def normalize_unit_sphere(xyz: torch.Tensor) -> torch.Tensor:
    """Centre each cloud on its centroid and scale its farthest point to radius 1."""
    centred = xyz - xyz.mean(-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(-1, keepdim=True).unsqueeze(-1)
    return centred / radius.clamp_min(1e-12)


def read_names(path: Path) -> list[str]:
    """Non-empty stripped lines of a names/list file."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file ({e})") from None


class PointClouds(Dataset):
    """In-memory clouds (S, N, 3) and labels; items are (FloatTensor (N, 3), int)."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 source: str):
        check_points(points, source)
        self.points = points.float().contiguous()
        self.labels = as_labels(np.asarray(labels), source, len(class_names))
        if len(self.labels) != len(self.points):
            raise DataError(f"{source}: {len(self.points)} clouds but {len(self.labels)} labels")
        self.class_names = list(class_names)
        self.source = source

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.points[index], int(self.labels[index])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} clouds of {self.points.shape[1]} points, "
                f"{self.num_classes} classes, from {self.source})")


# Official caches are pickles; only numpy arrays and plain containers may come out of them.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: Path):
    """Load an official cache/fold pickle without executing arbitrary code."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as e:
        raise DataError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e}); "
                        "rebuild it (tools/prepare_data.py ... --force) or download it again"
                        ) from None


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only when the block succeeds.

    Refuses an existing `path` unless `force`, so a user's file is never lost to a crash
    or a mistyped command.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dump_pickle(obj, path: Path, force: bool = False) -> Path:
    """Write `obj` atomically with pickle protocol 4 (readable by the official code)."""
    with atomic_output(path, force) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def read_h5(path: Path, keys: Sequence[str], layout: str) -> dict[str, np.ndarray]:
    """Arrays `keys` of an h5 file; names the file when it is absent, corrupt or incomplete."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise missing("h5 file", path, layout)
    try:
        with h5py.File(path, "r") as f:
            found = sorted(f.keys())
            absent = [k for k in keys if k not in f]
            if absent:
                raise DataError(f"{path}: missing key(s) {absent}; keys found: {found}; "
                                f"expected {list(keys)}")
            return {k: np.asarray(f[k]) for k in keys}
    except OSError as e:
        raise DataError(f"{path}: truncated or corrupt h5 file ({e})") from None
