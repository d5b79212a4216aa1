"""One point cloud from a user's file: .txt/.xyz/.csv, .npy, .ply, .pcd -> float32 (N, 3).

PLY and PCD go through Open3D when it can be imported; otherwise a small reader handles
the uncompressed variants (PLY ascii and binary, PCD ascii and binary), so classifying a
file never needs Open3D's system libraries.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import DataError, check_points

SUFFIXES = (".txt", ".xyz", ".csv", ".npy", ".ply", ".pcd")
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4",
              ("I", 8): "i8", ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def read_points(path: str | Path, use_open3d: bool = True) -> np.ndarray:
    """The xyz of every point in `path` as float32 (N, 3); errors name the file and why."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if suffix == ".npy":
            xyz = np.load(path, allow_pickle=False)
            xyz = xyz[0] if xyz.ndim == 3 and len(xyz) == 1 else xyz
        elif suffix in (".ply", ".pcd"):
            xyz = (_read_open3d(path) if use_open3d else None)
            if xyz is None:
                xyz = _read_ply(path) if suffix == ".ply" else _read_pcd(path)
        else:
            with open(path) as f:
                first = f.readline()
            xyz = np.loadtxt(path, delimiter="," if "," in first else None, ndmin=2,
                             dtype=np.float64)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot read points ({err})") from None
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] < 3 or len(xyz) == 0:
        raise DataError(f"{path}: expected rows of x, y, z[, ...], got an array of shape "
                        f"{xyz.shape}")
    xyz = np.ascontiguousarray(xyz[:, :3], dtype=np.float32)
    check_points(torch.from_numpy(xyz)[None], str(path))
    return xyz


def _read_open3d(path: Path) -> np.ndarray | None:
    """Points through Open3D, or None when Open3D cannot be imported."""
    try:
        import open3d as o3d
    except (ImportError, OSError):
        return None
    cloud = o3d.io.read_point_cloud(str(path))
    if not cloud.has_points():
        raise ValueError("Open3D read no points (empty or unreadable file)")
    return np.asarray(cloud.points)


def _header(raw: bytes, end: bytes) -> tuple[list[str], int]:
    """Header lines up to and including the line starting with `end`, and the data offset."""
    lines, offset = [], 0
    while True:
        nl = raw.find(b"\n", offset)
        if nl < 0:
            raise ValueError(f"no {end.decode()!r} line in the header")
        line = raw[offset:nl].decode("ascii", "replace").strip()
        offset = nl + 1
        lines.append(line)
        if line.startswith(end.decode()):
            return lines, offset


def _read_ply(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if not raw.startswith(b"ply"):
        raise ValueError("not a PLY file (no 'ply' magic)")
    lines, offset = _header(raw, b"end_header")
    fmt, count, props, element = None, None, [], None
    for line in lines:
        words = line.split()
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            element = words[1]
            if element == "vertex":
                count = int(words[2])
            elif count is None:
                raise ValueError(f"element {element!r} before the vertices is not supported "
                                 "without Open3D")
        elif words[:1] == ["property"] and element == "vertex":
            if words[1] == "list":
                raise ValueError("list properties on vertices are not supported without Open3D")
            props.append((words[2], _PLY_TYPES[words[1]]))
    names = [n for n, _ in props]
    if count is None or not {"x", "y", "z"} <= set(names):
        raise ValueError("no vertex element with x, y, z properties")
    if fmt == "ascii":
        rows = b"\n".join(raw[offset:].split(b"\n")[:count])
        table = np.loadtxt(rows.decode().splitlines(), ndmin=2)[:, :len(props)]
        return table[:, [names.index(a) for a in "xyz"]]
    order = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(fmt)
    if order is None:
        raise ValueError(f"unknown PLY format {fmt!r}")
    dtype = np.dtype([(n, order + t) for n, t in props])
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return np.stack([data[a] for a in "xyz"], axis=1)


def _read_pcd(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    lines, offset = _header(raw, b"DATA")
    head = {ln.split()[0].upper(): ln.split()[1:] for ln in lines
            if ln and not ln.startswith("#")}
    fields = head.get("FIELDS", [])
    if not {"x", "y", "z"} <= set(fields):
        raise ValueError("no x, y, z fields in the PCD header")
    count = int(head["POINTS"][0]) if "POINTS" in head else int(head["WIDTH"][0])
    kind = head["DATA"][0].lower()
    if kind == "ascii":
        table = np.loadtxt(raw[offset:].decode().splitlines()[:count], ndmin=2)
        return table[:, [fields.index(a) for a in "xyz"]]
    if kind != "binary":
        raise ValueError(f"PCD DATA {kind} needs Open3D (pip install open3d)")
    sizes = [int(s) for s in head.get("SIZE", ["4"] * len(fields))]
    types = head.get("TYPE", ["F"] * len(fields))
    counts = [int(c) for c in head.get("COUNT", ["1"] * len(fields))]
    dtype = np.dtype([(f, "<" + _PCD_TYPES[(t, s)], (c,)) if c > 1
                      else (f, "<" + _PCD_TYPES[(t, s)])
                      for f, t, s, c in zip(fields, types, sizes, counts, strict=True)])
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return np.stack([data[a] for a in "xyz"], axis=1)
