"""Procedural part-labelled shapes for the 16 ShapeNetPart categories (no download).

Each category is a small assembly of primitives (boxes, tubes, discs, spheres, cones, tori)
with randomised proportions; every primitive carries one of the category's official part
labels (an airplane has a body, wings, a tail and engines: labels 0-3). Points are sampled
over the surface of the assembly; a part's share is proportional to its area, with a floor
so that small parts (a trigger, a handlebar) still get points. Deterministic per
``(seed, split, category)``. ``write_shapenetpart_layout`` writes them in the official
``shapenetcore_partanno_segmentation_benchmark_v0_normal`` layout.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataError, atomic_output, normalize_unit_sphere
from .shapenetpart import (
    AUGMENT_KEYS,
    SHAPENETPART_CATEGORIES,
    SHAPENETPART_PARTS,
    SPLIT_LIST,
    SYNSETS,
)
from .synthetic import (
    _at,
    _box,
    _cone_side,
    _cylinder,
    _disc,
    _ellipsoid,
    _refuse_existing,
    _seed,
    _sphere,
    _torus,
    _tube,
    _u,
)

Part = tuple[torch.Tensor, torch.Tensor]
SMALL_PART_SHARE = 0.3  # of the points, spread evenly over the primitives before areas count


def _turn(part: Part, order: tuple[int, int, int]) -> Part:
    """Reorient a part by permuting its axes (``(1, 0, 2)``: a y-axis tube along x)."""
    pts, area = part
    return pts[..., list(order)], area


def _size(g, S, x, y, z) -> torch.Tensor:
    """``(S, 3)`` box sizes; each of x, y, z is a number, an (S,) tensor or a (lo, hi) range."""
    return torch.stack([_u(g, S, *v) if isinstance(v, tuple) else
                        torch.as_tensor(v, dtype=torch.float32).expand(S) for v in (x, y, z)], -1)


ALONG_X, ALONG_Z = (1, 0, 2), (0, 2, 1)  # tube/cylinder axis y -> x, y -> z; ring xz -> xy


def airplane(g, S, n):
    L = _u(g, S, 1.6, 2.2)
    engines = [(_at(_turn(_tube(g, S, n, 0.1, 0.45), ALONG_X), x=0.1, y=-0.15, z=z), 3)
               for z in (-0.55, 0.55)]
    return [(_turn(_tube(g, S, n, _u(g, S, 0.12, 0.18), L), ALONG_X), 0),
            (_at(_box(g, S, n, _size(g, S, (0.35, 0.5), 0.04, (1.6, 2.2))), x=0.1), 1),
            (_at(_box(g, S, n, _size(g, S, (0.2, 0.3), (0.35, 0.5), 0.04)), x=-L / 2 + 0.1,
                 y=0.3), 2), *engines]


def bag(g, S, n):
    size = _size(g, S, (1.0, 1.4), (0.8, 1.1), (0.3, 0.45))
    return [(_box(g, S, n, size), 0),
            (_at(_turn(_torus(g, S, n, _u(g, S, 0.3, 0.4), 0.04), ALONG_Z),
                 y=size[:, 1] / 2 + 0.1), 1)]


def cap(g, S, n):
    r = _u(g, S, 0.5, 0.6)
    return [(_sphere(g, S, n, r, half=1), 0),
            (_at(_box(g, S, n, _size(g, S, (0.4, 0.6), 0.02, (0.7, 0.9))), x=r + 0.2), 1)]


def car(g, S, n):
    size = _size(g, S, (1.8, 2.2), (0.4, 0.5), (0.8, 1.0))
    wheels = [(_at(_turn(_cylinder(g, S, n, 0.2, 0.15), ALONG_Z), x=x, y=-0.3, z=z), 2)
              for x in (-0.6, 0.6) for z in (-0.5, 0.5)]
    return [(_box(g, S, n, size), 0),
            (_at(_box(g, S, n, _size(g, S, (0.8, 1.1), (0.3, 0.4), 0.75)), x=-0.1,
                 y=size[:, 1] / 2 + 0.17), 1), *wheels,
            (_at(_box(g, S, n, _size(g, S, 0.1, 0.2, 0.8)), x=size[:, 0] / 2 + 0.06), 3)]


def chair(g, S, n):
    leg = _u(g, S, 0.7, 0.9)
    legs = [(_at(_box(g, S, n, _size(g, S, 0.08, 0.8, 0.08)), x=x, y=-leg / 2 - 0.05, z=z), 2)
            for x in (-0.42, 0.42) for z in (-0.42, 0.42)]
    arms = [(_at(_box(g, S, n, _size(g, S, 0.08, 0.08, 0.8)), x=x, y=0.35), 3)
            for x in (-0.52, 0.52)]
    back = _u(g, S, 0.9, 1.2)
    return [(_at(_box(g, S, n, _size(g, S, 1.0, back, 0.1)), y=back / 2, z=-0.5), 0),
            (_box(g, S, n, _size(g, S, 1.0, 0.1, 1.0)), 1), *legs, *arms]


def earphone(g, S, n):
    cups = [(_at(_ellipsoid(g, S, n, _size(g, S, 0.12, (0.25, 0.3), 0.25)), x=x), 0)
            for x in (-0.6, 0.6)]
    band = [(_at(_box(g, S, n, _size(g, S, 1.3, 0.06, 0.12)), y=0.6), 1),
            *[(_at(_box(g, S, n, _size(g, S, 0.06, 0.3, 0.12)), x=x, y=0.42), 1)
              for x in (-0.62, 0.62)]]
    return [*cups, *band, (_at(_tube(g, S, n, 0.03, _u(g, S, 0.6, 0.9)), x=0.6, y=-0.7), 2)]


def guitar(g, S, n):
    return [(_at(_box(g, S, n, _size(g, S, 0.25, 0.3, 0.06)), y=1.35), 0),
            (_at(_box(g, S, n, _size(g, S, 0.12, 1.2, 0.06)), y=0.6), 1),
            (_at(_ellipsoid(g, S, n, _size(g, S, (0.5, 0.65), (0.6, 0.8), 0.12)), y=-0.6), 2)]


def knife(g, S, n):
    return [(_at(_box(g, S, n, _size(g, S, (0.2, 0.3), (1.0, 1.4), 0.02)), y=0.55), 0),
            (_at(_cylinder(g, S, n, 0.08, _u(g, S, 0.5, 0.7)), y=-0.45), 1)]


def lamp(g, S, n):
    return [(_at(_cylinder(g, S, n, _u(g, S, 0.3, 0.45), 0.08), y=-1.0), 0),
            (_at(_tube(g, S, n, 0.04, 1.3), y=-0.3), 1),
            (_at(_cone_side(g, S, n, _u(g, S, 0.4, 0.55), 0.45), y=0.65), 2),
            (_at(_sphere(g, S, n, 0.14), y=0.42), 3)]


def laptop(g, S, n):
    return [(_box(g, S, n, _size(g, S, (1.2, 1.5), 0.05, (0.9, 1.1))), 0),
            (_at(_box(g, S, n, _size(g, S, (1.2, 1.5), (0.8, 1.0), 0.04)), y=0.45, z=-0.5), 1)]


def motorbike(g, S, n):
    wheels = [(_at(_turn(_torus(g, S, n, 0.32, 0.08), ALONG_Z), x=x, y=-0.35), 1)
              for x in (-0.8, 0.8)]
    return [(_box(g, S, n, _size(g, S, (1.1, 1.3), 0.3, 0.25)), 0), *wheels,
            (_at(_box(g, S, n, _size(g, S, 0.5, 0.08, 0.3)), x=-0.3, y=0.2), 2),
            (_at(_box(g, S, n, _size(g, S, 0.06, 0.06, 0.8)), x=0.6, y=0.45), 3),
            (_at(_sphere(g, S, n, 0.1), x=0.85, y=0.25), 4),
            (_at(_turn(_tube(g, S, n, 0.05, 0.6), ALONG_X), x=-0.5, y=-0.12, z=0.22), 5)]


def mug(g, S, n):
    r = _u(g, S, 0.4, 0.5)
    return [(_tube(g, S, n, r, 1.0), 0), (_at(_disc(g, S, n, r), y=-0.5), 0),
            (_at(_turn(_torus(g, S, n, 0.25, 0.06), ALONG_Z), x=r + 0.15), 1)]


def pistol(g, S, n):
    return [(_at(_box(g, S, n, _size(g, S, (0.9, 1.1), 0.2, 0.15)), y=0.2), 0),
            (_at(_box(g, S, n, _size(g, S, 0.22, (0.5, 0.7), 0.15)), x=-0.35, y=-0.25), 1),
            (_at(_turn(_torus(g, S, n, 0.1, 0.03), ALONG_Z), x=-0.05, y=-0.02), 2)]


def rocket(g, S, n):
    return [(_tube(g, S, n, _u(g, S, 0.2, 0.28), 1.6), 0),
            (_at(_cone_side(g, S, n, 0.25, _u(g, S, 0.4, 0.6)), y=1.05), 1),
            (_at(_box(g, S, n, _size(g, S, 0.9, 0.4, 0.03)), y=-0.7), 2),
            (_at(_box(g, S, n, _size(g, S, 0.03, 0.4, 0.9)), y=-0.7), 2)]


def skateboard(g, S, n):
    wheels = [(_at(_turn(_cylinder(g, S, n, 0.07, 0.08), ALONG_Z), x=x, y=-0.16, z=z), 1)
              for x in (-0.7, 0.7) for z in (-0.2, 0.2)]
    trucks = [(_at(_box(g, S, n, _size(g, S, 0.1, 0.08, 0.35)), x=x, y=-0.07), 2)
              for x in (-0.7, 0.7)]
    return [(_box(g, S, n, _size(g, S, (1.8, 2.2), 0.05, (0.45, 0.55))), 0), *wheels, *trucks]


def table(g, S, n):
    legs = [(_at(_box(g, S, n, _size(g, S, 0.07, 1.0, 0.07)), x=x, z=z), 1)
            for x in (-0.7, 0.7) for z in (-0.42, 0.42)]
    return [(_at(_box(g, S, n, _size(g, S, (1.5, 1.7), 0.06, (0.9, 1.1))), y=0.53), 0), *legs,
            (_at(_box(g, S, n, _size(g, S, 1.35, 0.04, 0.8)), y=-0.25), 2)]


SHAPES: dict[str, Callable] = dict(zip(SHAPENETPART_CATEGORIES, (
    airplane, bag, cap, car, chair, earphone, guitar, knife, lamp, laptop, motorbike, mug,
    pistol, rocket, skateboard, table), strict=True))


def _assemble(g, parts: list[tuple[Part, int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (S, n, 3), local part index (S, n)) sampled over the labelled primitives."""
    pts = torch.stack([p for (p, _), _ in parts], 1)  # (S, K, n, 3)
    area = torch.stack([a for (_, a), _ in parts], 1)  # (S, K)
    S, K = area.shape
    share = (1 - SMALL_PART_SHARE) * area / area.sum(1, keepdim=True) + SMALL_PART_SHARE / K
    choice = torch.multinomial(share, n, replacement=True, generator=g)  # (S, n)
    picked = pts.gather(1, choice.view(S, 1, n, 1).expand(S, 1, n, 3)).squeeze(1)
    return picked, torch.tensor([label for _, label in parts])[choice]


def generate_parts(samples_per_category: int = 40, npoints: int = 2048, seed: int = 0,
                   split: str = "train", num_categories: int = 16, noise: float = 0.005
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(points float32 (S, npoints, 3) on the unit sphere, category int64 (S,), part labels
    int64 (S, npoints) in the official 0..49 numbering) for the first ``num_categories``."""
    if not 1 <= num_categories <= len(SHAPES):
        raise DataError(f"num_categories must be in 1..{len(SHAPES)}; got {num_categories}")
    if samples_per_category < 1 or npoints < 1:
        raise DataError(f"samples_per_category and npoints must be >= 1; got "
                        f"{samples_per_category}, {npoints}")
    clouds, labels = [], []
    for c, (name, shape) in enumerate(list(SHAPES.items())[:num_categories]):
        g = torch.Generator().manual_seed(_seed(seed, split, c))
        pts, local = _assemble(g, shape(g, samples_per_category, npoints), npoints)
        pts = pts + noise * torch.randn(pts.shape, generator=g)
        clouds.append(normalize_unit_sphere(pts))
        labels.append(local + SHAPENETPART_PARTS[name][0])
    categories = torch.arange(num_categories).repeat_interleave(samples_per_category)
    return torch.cat(clouds).float(), categories, torch.cat(labels)


class SyntheticParts(Dataset):
    """``generate_parts(...)`` as a dataset; items as :class:`ShapeNetPart`'s:
    ``(points (npoints, 3), category, part labels (npoints,))``."""

    def __init__(self, samples_per_category: int = 40, npoints: int = 2048, seed: int = 0,
                 split: str = "train", num_categories: int = 16, noise: float = 0.005):
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test'; got {split!r}")
        self.points, self.categories, self.parts = generate_parts(
            samples_per_category, npoints, seed, split, num_categories, noise)
        self.class_names = SHAPENETPART_CATEGORIES[:num_categories]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.points[index], int(self.categories[index]), self.parts[index]


_OPTIONS = ("samples_per_category", "npoints", "seed", "num_categories", "noise")
SYNTHETIC_PARTS_KEYS = (*_OPTIONS, *AUGMENT_KEYS)


def build_synthetic_parts(cfg: dict, split: str) -> SyntheticParts:
    options = {k: cfg[k] for k in _OPTIONS if cfg.get(k) is not None}
    return SyntheticParts(split=split, **options)


def write_shapenetpart_layout(root: str | Path, samples_per_category: int = 4,
                              npoints: int = 2500, seed: int = 0, num_categories: int = 16,
                              force: bool = False) -> Path:
    """Write synthetic part shapes in the official ShapeNetPart layout; returns ``root``.

    Per category, ``samples_per_category`` shapes each in train, val (drawn from the train
    stream) and test. Rows ``x y z nx ny nz part`` with normals written as 0 (not generated).
    """
    root = Path(root).expanduser()
    names = SHAPENETPART_CATEGORIES[:num_categories]
    k = samples_per_category
    draws = {s: generate_parts(k * (2 if s == "train" else 1), npoints, seed, s,
                               num_categories) for s in ("train", "test")}
    entries: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rows = []
    for s, (points, categories, parts) in draws.items():
        for i, (cloud, c, label) in enumerate(zip(points, categories.tolist(), parts,
                                                  strict=True)):
            j = i % (len(points) // num_categories)
            split = "test" if s == "test" else ("train" if j < k else "val")
            shape_id = f"{split}{j:05d}{c:02d}"
            entries[split].append(f"shape_data/{SYNSETS[names[c]]}/{shape_id}")
            rows.append((root / SYNSETS[names[c]] / f"{shape_id}.txt", cloud, label))
    lists = [root / "synsetoffset2category.txt",
             *(root / SPLIT_LIST.format(s) for s in entries)]
    _refuse_existing([p for p, _, _ in rows] + lists, force)
    for path, cloud, label in rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = np.hstack([cloud.numpy(), np.zeros((len(cloud), 3)), label.numpy()[:, None]])
        np.savetxt(path, table, fmt=["%.6f"] * 6 + ["%d"], delimiter=" ")
    with atomic_output(lists[0], force=True) as tmp:
        tmp.write_text("".join(f"{name}\t{SYNSETS[name]}\n" for name in names))
    for path, split in zip(lists[1:], entries, strict=True):
        with atomic_output(path, force=True) as tmp:
            tmp.write_text(json.dumps(entries[split]))
    return root
