"""Procedural labelled shapes: a dataset that needs no download and trains in minutes on CPU.

Each class is a primitive or a composition of primitives with randomised proportions,
sampled uniformly over its surface (parts are chosen in proportion to their area). Every
cloud is then centred and scaled to a random radius drawn from the same range for all
classes, so size never identifies a class; pose, noise and partial occlusion are options.
Generation is vectorised over the clouds of a class and deterministic for a seed; the
train and test splits use different streams.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .common import DataError, PointClouds, atomic_output, normalize_unit_sphere
from .modelnet40 import cache_name
from .scanobjectnn import SCANOBJECTNN_CLASSES, VARIANTS, h5_path

Part = tuple[torch.Tensor, torch.Tensor]  # points (S, n, 3), surface area (S,)
TAU = 2 * math.pi


def _u(g, shape, lo=0.0, hi=1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _const(S: int, value: float) -> torch.Tensor:
    return torch.full((S,), float(value))


def _at(part: Part, x=0.0, y=0.0, z=0.0) -> Part:
    """Translate a part; offsets are floats or per-cloud tensors (S,)."""
    pts, area = part
    offset = torch.stack(torch.broadcast_tensors(*(torch.as_tensor(v, dtype=pts.dtype)
                                                   for v in (x, y, z))), -1)
    return pts + offset.reshape(-1, 1, 3), area


def _compose(g, parts: Sequence[Part]) -> Part:
    """Union of parts; each point comes from a part with probability proportional to area."""
    pts = torch.stack([p for p, _ in parts], 1)  # (S, K, n, 3)
    area = torch.stack([a for _, a in parts], 1)  # (S, K)
    S, _, n, _ = pts.shape
    choice = torch.multinomial(area, n, replacement=True, generator=g)  # (S, n)
    picked = pts.gather(1, choice.view(S, 1, n, 1).expand(S, 1, n, 3)).squeeze(1)
    return picked, area.sum(1)


def _ellipsoid(g, S, n, radii: torch.Tensor, half: int = 0) -> Part:
    """Ellipsoid surface (S, 3) radii; `half` = +1 / -1 keeps the upper / lower half in y."""
    v = torch.randn(S, n, 3, generator=g)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if half:
        v[..., 1] = half * v[..., 1].abs()
    area = 4 * math.pi * radii.prod(-1) ** (2 / 3) / (2 if half else 1)
    return v * radii[:, None, :], area


def _sphere(g, S, n, r, half: int = 0) -> Part:
    return _ellipsoid(g, S, n, torch.as_tensor(r).expand(S).unsqueeze(-1).expand(S, 3), half)


def _box(g, S, n, size: torch.Tensor) -> Part:
    """Surface of an axis-aligned box of side lengths (S, 3), centred at the origin."""
    sx, sy, sz = size.unbind(-1)
    face = torch.stack([sy * sz, sx * sz, sx * sy], -1)  # area of the faces normal to x, y, z
    axis = torch.multinomial(face, n, replacement=True, generator=g)  # (S, n)
    pts = (torch.rand(S, n, 3, generator=g) - 0.5) * size[:, None, :]
    sign = torch.where(torch.rand(S, n, generator=g) < 0.5, -0.5, 0.5)
    pts.scatter_(2, axis.unsqueeze(-1), (sign * size.gather(1, axis)).unsqueeze(-1))
    return pts, 2 * face.sum(-1)


def _tube(g, S, n, r, h) -> Part:
    """Open cylinder of radius r and height h about the y axis."""
    r, h = torch.as_tensor(r).expand(S), torch.as_tensor(h).expand(S)
    theta = _u(g, (S, n), 0, TAU)
    y = (torch.rand(S, n, generator=g) - 0.5) * h[:, None]
    pts = torch.stack([r[:, None] * theta.cos(), y, r[:, None] * theta.sin()], -1)
    return pts, TAU * r * h


def _disc(g, S, n, r_out, r_in=0.0) -> Part:
    """Flat annulus (a disc when r_in = 0) in the y = 0 plane."""
    r_out, r_in = torch.as_tensor(r_out).expand(S), torch.as_tensor(r_in).expand(S)
    theta = _u(g, (S, n), 0, TAU)
    rho = (torch.rand(S, n, generator=g) * (r_out**2 - r_in**2)[:, None] + r_in[:, None] ** 2)
    rho = rho.sqrt()
    pts = torch.stack([rho * theta.cos(), torch.zeros_like(rho), rho * theta.sin()], -1)
    return pts, math.pi * (r_out**2 - r_in**2)


def _cylinder(g, S, n, r, h) -> Part:
    half = torch.as_tensor(h).expand(S) / 2
    return _compose(g, [_tube(g, S, n, r, h), _at(_disc(g, S, n, r), y=half),
                        _at(_disc(g, S, n, r), y=-half)])


def _cone_side(g, S, n, r, h) -> Part:
    """Lateral surface of a cone, apex at y = h/2, rim of radius r at y = -h/2."""
    r, h = torch.as_tensor(r).expand(S), torch.as_tensor(h).expand(S)
    s = torch.rand(S, n, generator=g).sqrt()  # area grows linearly away from the apex
    theta = _u(g, (S, n), 0, TAU)
    rho = r[:, None] * s
    pts = torch.stack([rho * theta.cos(), h[:, None] * (0.5 - s), rho * theta.sin()], -1)
    return pts, math.pi * r * (r**2 + h**2).sqrt()


def _torus(g, S, n, R, r) -> Part:
    """Torus about the y axis; the tube angle is drawn by rejection for uniform area."""
    R, r = torch.as_tensor(R).expand(S)[:, None], torch.as_tensor(r).expand(S)[:, None]
    theta = _u(g, (S, n), 0, TAU)
    phi = _u(g, (S, n, 8), 0, TAU)
    # the tube angle has density proportional to R + r cos(phi): first accepted of 8 draws
    bound = (R + r)[..., None]
    accept = torch.rand(S, n, 8, generator=g) * bound < R[..., None] + r[..., None] * phi.cos()
    phi = phi.gather(-1, accept.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)
    ring = R + r * phi.cos()
    pts = torch.stack([ring * theta.cos(), r * phi.sin(), ring * theta.sin()], -1)
    return pts, (TAU**2 * R * r).squeeze(-1)


def _triangles(g, S, n, verts: torch.Tensor) -> Part:
    """Uniform samples on a triangle mesh given as (S, T, 3 corners, 3)."""
    a, b, c = verts.unbind(2)
    area = 0.5 * torch.linalg.cross(b - a, c - a).norm(dim=-1)  # (S, T)
    tri = torch.multinomial(area, n, replacement=True, generator=g)
    idx = tri.view(S, n, 1, 1).expand(S, n, 3, 3)
    corners = verts.gather(1, idx)  # (S, n, 3, 3)
    su = torch.rand(S, n, 1, generator=g).sqrt()
    v = torch.rand(S, n, 1, generator=g)
    pts = (1 - su) * corners[:, :, 0] + su * (1 - v) * corners[:, :, 1] + su * v * corners[:, :, 2]
    return pts, area.sum(-1)


def _helix_tube(g, S, n, R, turns, h, r) -> Part:
    """Tube of radius r around a helix (radius R, `turns` turns, height h) about y."""
    t = torch.rand(S, n, generator=g)
    phi = _u(g, (S, n), 0, TAU)
    R, turns, h = R[:, None], turns[:, None], h[:, None]
    a = TAU * turns * t
    centre = torch.stack([R * a.cos(), h * (t - 0.5), R * a.sin()], -1)
    tangent = torch.stack([-R * TAU * turns * a.sin(), h.expand_as(a), R * TAU * turns * a.cos()],
                          -1)
    tangent = tangent / tangent.norm(dim=-1, keepdim=True)
    normal = torch.stack([-a.cos(), torch.zeros_like(a), -a.sin()], -1)
    binormal = torch.linalg.cross(tangent, normal)
    pts = centre + r * (phi.cos()[..., None] * normal + phi.sin()[..., None] * binormal)
    length = ((TAU * R * turns) ** 2 + h**2).sqrt().squeeze(-1)
    return pts, TAU * r * length


# ---- classes -------------------------------------------------------------------------------

def sphere(g, S, n):
    return _ellipsoid(g, S, n, _u(g, (S, 3), 0.85, 1.15))[0]


def cube(g, S, n):
    return _box(g, S, n, _u(g, (S, 3), 0.8, 1.2))[0]


def cylinder(g, S, n):
    return _cylinder(g, S, n, _u(g, S, 0.35, 0.5), _u(g, S, 1.5, 2.2))[0]


def cone(g, S, n):
    r, h = _u(g, S, 0.5, 0.8), _u(g, S, 1.2, 1.8)
    return _compose(g, [_cone_side(g, S, n, r, h), _at(_disc(g, S, n, r), y=-h / 2)])[0]


def torus(g, S, n):
    return _torus(g, S, n, 1.0, _u(g, S, 0.2, 0.35))[0]


def disc(g, S, n):
    pts = _disc(g, S, n, 1.0)[0]
    return pts * torch.stack([_u(g, S, 0.7, 1.0), _const(S, 1), _const(S, 1)], -1)[:, None]


def dumbbell(g, S, n):
    r, d = _u(g, S, 0.3, 0.4), _u(g, S, 0.75, 0.95)
    return _compose(g, [_at(_sphere(g, S, n, r), y=d), _at(_sphere(g, S, n, r), y=-d),
                        _tube(g, S, n, 0.07, 2 * d)])[0]


def _legs(g, S, n, w, d, h, inset=0.1, r=0.05) -> list[Part]:
    return [_at(_tube(g, S, n, r, h), x=sx * (w / 2 - inset), y=h / 2, z=sz * (d / 2 - inset))
            for sx in (-1, 1) for sz in (-1, 1)]


def table(g, S, n):
    w, d, h, t = _u(g, S, 1.6, 2.0), _u(g, S, 0.9, 1.3), _u(g, S, 0.8, 1.1), 0.08
    top = _at(_box(g, S, n, torch.stack([w, _const(S, t), d], -1)), y=h + t / 2)
    return _compose(g, [top, *_legs(g, S, n, w, d, h)])[0]


def chair(g, S, n):
    w, d, h, t = _u(g, S, 0.9, 1.1), _u(g, S, 0.9, 1.1), _u(g, S, 0.8, 1.0), 0.08
    back_h = _u(g, S, 0.8, 1.1)
    seat = _at(_box(g, S, n, torch.stack([w, _const(S, t), d], -1)), y=h + t / 2)
    back = _at(_box(g, S, n, torch.stack([w, back_h, _const(S, t)], -1)),
               y=h + t + back_h / 2, z=-d / 2 + t / 2)
    return _compose(g, [seat, back, *_legs(g, S, n, w, d, h)])[0]


def capsule(g, S, n):
    r, h = _u(g, S, 0.3, 0.45), _u(g, S, 0.8, 1.2)
    return _compose(g, [_tube(g, S, n, r, h), _at(_sphere(g, S, n, r, half=1), y=h / 2),
                        _at(_sphere(g, S, n, r, half=-1), y=-h / 2)])[0]


def pyramid(g, S, n):
    b, h = _u(g, S, 1.4, 1.8) / 2, _u(g, S, 1.0, 1.5)
    zero = torch.zeros(S)
    corners = [torch.stack([sx * b, zero, sz * b], -1) for sx, sz in
               ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    apex = torch.stack([zero, h, zero], -1)
    faces = [(corners[i], corners[(i + 1) % 4], apex) for i in range(4)]
    faces += [(corners[0], corners[1], corners[2]), (corners[0], corners[2], corners[3])]
    verts = torch.stack([torch.stack(f, 1) for f in faces], 1)  # (S, 6, 3, 3)
    return _triangles(g, S, n, verts)[0]


def mug(g, S, n):
    r, h, R = _u(g, S, 0.45, 0.55), _u(g, S, 1.0, 1.3), _u(g, S, 0.25, 0.32)
    handle_pts, handle_area = _torus(g, S, n, R, 0.05)
    handle = (handle_pts[..., [0, 2, 1]], handle_area)  # turn into the x-y plane
    return _compose(g, [_tube(g, S, n, r, h), _at(_disc(g, S, n, r), y=-h / 2),
                        _at(handle, x=r + 0.8 * R)])[0]


def lamp(g, S, n):
    base_r, pole_h = _u(g, S, 0.4, 0.5), _u(g, S, 1.2, 1.6)
    shade_r, shade_h = _u(g, S, 0.45, 0.6), _u(g, S, 0.4, 0.55)
    return _compose(g, [_at(_cylinder(g, S, n, base_r, 0.08), y=0.04),
                        _at(_tube(g, S, n, 0.035, pole_h), y=pole_h / 2),
                        _at(_cone_side(g, S, n, shade_r, shade_h), y=pole_h)])[0]


def ring(g, S, n):
    return _disc(g, S, n, 1.0, _u(g, S, 0.45, 0.6))[0]


def spring(g, S, n):
    return _helix_tube(g, S, n, _u(g, S, 0.5, 0.7), _u(g, S, 3.0, 4.5), _u(g, S, 1.6, 2.2),
                       0.07)[0]


def bowl(g, S, n):
    radii = torch.stack([_const(S, 1), _u(g, S, 0.5, 0.8), _const(S, 1)], -1)
    return _ellipsoid(g, S, n, radii, half=-1)[0]


SHAPES: dict[str, Callable] = {f.__name__: f for f in (
    sphere, cube, cylinder, cone, torus, disc, dumbbell, table, chair, capsule, pyramid, mug,
    lamp, ring, spring, bowl)}
CLASSES = tuple(SHAPES)
ROTATIONS = ("none", "up", "so3")


# ---- pose, occlusion, generation -----------------------------------------------------------

def _rotations(g, S: int, mode: str) -> torch.Tensor:
    """(S, 3, 3) rotations: identity, about the up (y) axis, or uniform over SO(3)."""
    if mode == "none":
        return torch.eye(3).expand(S, 3, 3)
    if mode == "up":
        a = _u(g, S, 0, TAU)
        c, s, o, z = a.cos(), a.sin(), torch.ones(S), torch.zeros(S)
        return torch.stack([c, z, s, z, o, z, -s, z, c], -1).view(S, 3, 3)
    q = torch.randn(S, 4, generator=g)
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
                       -1).view(S, 3, 3)


def _occlude(g, pts: torch.Tensor, occlusion: float, npoints: int) -> torch.Tensor:
    """Cut away a random fraction in [0, occlusion] of each cloud beyond a random plane,
    then keep `npoints` random points of the rest."""
    S, M, _ = pts.shape
    direction = torch.randn(S, 1, 3, generator=g)
    proj = (pts * direction).sum(-1)  # (S, M)
    keep = M - (torch.rand(S, generator=g) * occlusion * M).long()  # >= npoints by choice of M
    threshold = proj.sort(1).values.gather(1, (keep - 1).unsqueeze(1))
    score = torch.rand(S, M, generator=g).masked_fill(proj > threshold, 2.0)
    idx = score.topk(npoints, dim=1, largest=False).indices
    return pts.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))


def _seed(seed: int, split: str, stream: int) -> int:
    """Independent seed per (seed, split, stream); streams are class labels (and one more)."""
    split_id = {"train": 0, "test": 1}[split]
    return int(np.random.SeedSequence([seed, split_id, stream]).generate_state(1)[0])


def generate(num_classes: int = 8, samples_per_class: int = 100, npoints: int = 1024,
             seed: int = 0, split: str = "train", noise: float = 0.01, occlusion: float = 0.0,
             rotation: str = "up", scale: Sequence[float] = (0.75, 1.0)
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(points float32 (C * samples_per_class, npoints, 3), labels int64) of the first
    `num_classes` classes of `CLASSES`; each class has its own seeded stream."""
    if not 1 <= num_classes <= len(CLASSES):
        raise DataError(f"synthetic num_classes must be in 1..{len(CLASSES)} (available: "
                        f"{', '.join(CLASSES)}); got {num_classes}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test'; got {split!r}")
    if rotation not in ROTATIONS:
        raise DataError(f"synthetic rotation must be one of {ROTATIONS}; got {rotation!r}")
    if not 0 <= occlusion < 1:
        raise DataError(f"synthetic occlusion is a fraction in [0, 1); got {occlusion}")
    if samples_per_class < 1 or npoints < 1:
        raise DataError(f"samples_per_class and npoints must be >= 1; got "
                        f"{samples_per_class}, {npoints}")
    lo, hi = scale
    S = samples_per_class
    clouds = []
    for label, shape in enumerate(list(SHAPES.values())[:num_classes]):
        g = torch.Generator().manual_seed(_seed(seed, split, label))
        m = npoints if occlusion == 0 else math.ceil(npoints / (1 - occlusion)) + 1
        pts = shape(g, S, m)
        if occlusion:
            pts = _occlude(g, pts, occlusion, npoints)
        pts = normalize_unit_sphere(pts) * _u(g, (S, 1, 1), lo, hi)
        pts = pts @ _rotations(g, S, rotation).transpose(1, 2)
        clouds.append(pts + noise * torch.randn(pts.shape, generator=g))
    labels = torch.arange(num_classes).repeat_interleave(S)
    return torch.cat(clouds).float(), labels


class SyntheticShapes(PointClouds):
    """`generate(...)` as a dataset; see the module docstring."""

    def __init__(self, num_classes: int = 8, samples_per_class: int = 100, npoints: int = 1024,
                 seed: int = 0, split: str = "train", noise: float = 0.01,
                 occlusion: float = 0.0, rotation: str = "up",
                 scale: Sequence[float] = (0.75, 1.0)):
        points, labels = generate(num_classes, samples_per_class, npoints, seed, split, noise,
                                  occlusion, rotation, scale)
        super().__init__(points, labels, CLASSES[:num_classes],
                         f"synthetic {split} (seed {seed})")


SYNTHETIC_KEYS = ("num_classes", "samples_per_class", "npoints", "seed", "noise", "occlusion",
                  "rotation", "scale")


def build_synthetic(cfg: dict, split: str) -> SyntheticShapes:
    options = {k: cfg[k] for k in SYNTHETIC_KEYS if k in cfg and cfg[k] is not None}
    return SyntheticShapes(split=split, **options)


# ---- writing the official layouts ----------------------------------------------------------

def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} files would be "
                              "replaced); pass --force (force=True) to overwrite")


def write_modelnet40_layout(root: str | Path, num_classes: int = 8, samples_per_class: int = 4,
                            npoints: int = 10000, seed: int = 0, force: bool = False,
                            **options) -> Path:
    """Write synthetic shapes as `modelnet40_normal_resampled` (txt, split lists, names).

    Normal columns are written as 0: PointCLoRA reads xyz only. Returns `root`.
    """
    root = Path(root).expanduser()
    names = CLASSES[:num_classes]
    splits = {s: generate(num_classes, samples_per_class, npoints, seed, s, **options)
              for s in ("train", "test")}
    # per class numbering: train 0001..S, test S+1..2S
    ids = {s: [f"{names[c]}_{k + 1 + (samples_per_class if s == 'test' else 0):04d}"
               for c in range(num_classes) for k in range(samples_per_class)] for s in splits}
    files = [root / f"{i.rsplit('_', 1)[0]}" / f"{i}.txt" for s in ids for i in ids[s]]
    lists = [root / "modelnet40_shape_names.txt", *(root / f"modelnet40_{s}.txt" for s in splits)]
    _refuse_existing(files + lists, force)
    stale = sorted(root.glob(cache_name("*", "*")))
    if stale:
        raise FileExistsError(f"{stale[0]} is a cache of the current files and would be stale; "
                              "remove the caches first")
    for s, (points, _) in splits.items():
        normals = np.zeros_like(points.numpy())
        for shape_id, cloud, normal in zip(ids[s], points.numpy(), normals, strict=True):
            path = root / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(path, np.hstack([cloud, normal]), fmt="%.6f", delimiter=",")
    for path, lines in ((lists[0], names), (lists[1], ids["train"]), (lists[2], ids["test"])):
        with atomic_output(path, force=True) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    return root


def write_scanobjectnn_layout(root: str | Path, variant: str = "pb_t50_rs",
                              num_classes: int = len(SCANOBJECTNN_CLASSES),
                              samples_per_class: int = 4, npoints: int = 2048, seed: int = 0,
                              background: float = 0.2, force: bool = False,
                              **options) -> Path:
    """Write synthetic shapes as the ScanObjectNN h5 files of `variant` (data, label, mask).

    OBJ_BG and PB_T50_RS replace a `background` fraction of each cloud by a floor patch
    (mask 0; object points have mask 1); PB_T50_RS clouds are also partly occluded.
    Labels index the ScanObjectNN class names. Returns `root`.
    """
    import h5py

    if variant not in VARIANTS:
        raise DataError(f"variant must be one of {sorted(VARIANTS)}; got {variant!r}")
    if num_classes > len(SCANOBJECTNN_CLASSES):
        raise DataError(f"ScanObjectNN has {len(SCANOBJECTNN_CLASSES)} classes; got "
                        f"num_classes={num_classes}")
    root = Path(root).expanduser()
    if variant == "pb_t50_rs":
        options.setdefault("occlusion", 0.3)
    targets = {s: h5_path(root, variant, s) for s in ("train", "test")}
    _refuse_existing(list(targets.values()), force)
    for split, path in targets.items():
        points, labels = generate(num_classes, samples_per_class, npoints, seed, split, **options)
        mask = torch.ones(points.shape[:2], dtype=torch.int64)
        if variant != "obj_only":
            g = torch.Generator().manual_seed(_seed(seed, split, len(CLASSES)))
            nb = int(background * npoints)
            floor = _u(g, (len(points), nb, 3), -1.0, 1.0)
            floor[..., 1] = points[..., 1].amin(1, keepdim=True) - 0.02
            points[:, npoints - nb:] = floor
            mask[:, npoints - nb:] = 0
        with atomic_output(path, force) as tmp, h5py.File(tmp, "w") as f:
            f["data"] = points.numpy().astype(np.float32)
            f["label"] = labels.numpy()
            f["mask"] = mask.numpy()
    return root
