"""ShapeNetPart (``shapenetcore_partanno_segmentation_benchmark_v0_normal``) for part segmentation.

Reads the official layout as the official ``PartNormalDataset`` does: categories from
``synsetoffset2category.txt`` (line order = category id), shapes from the split lists in
``train_test_split/``, one txt file per shape with rows ``x y z nx ny nz part``. Each item is
a random ``npoints``-subset drawn with replacement from the whole shape after its xyz is
centred and scaled to the unit sphere, as the official loader does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataError, missing, normalize_unit_sphere

# category -> its part labels (the official ``seg_classes``), in the category order.
SHAPENETPART_PARTS = {
    "Airplane": [0, 1, 2, 3], "Bag": [4, 5], "Cap": [6, 7], "Car": [8, 9, 10, 11],
    "Chair": [12, 13, 14, 15], "Earphone": [16, 17, 18], "Guitar": [19, 20, 21],
    "Knife": [22, 23], "Lamp": [24, 25, 26, 27], "Laptop": [28, 29],
    "Motorbike": [30, 31, 32, 33, 34, 35], "Mug": [36, 37], "Pistol": [38, 39, 40],
    "Rocket": [41, 42, 43], "Skateboard": [44, 45, 46], "Table": [47, 48, 49],
}
SHAPENETPART_CATEGORIES = list(SHAPENETPART_PARTS)
NUM_PARTS = 50
# synsetoffset2category.txt of the official release
SYNSETS = {
    "Airplane": "02691156", "Bag": "02773838", "Cap": "02954340", "Car": "02958343",
    "Chair": "03001627", "Earphone": "03261776", "Guitar": "03467517", "Knife": "03624134",
    "Lamp": "03636649", "Laptop": "03642806", "Motorbike": "03790512", "Mug": "03797390",
    "Pistol": "03948459", "Rocket": "04099429", "Skateboard": "04225987", "Table": "04379243",
}
SPLITS = {"train": ("train",), "val": ("val",), "trainval": ("train", "val"), "test": ("test",)}
SPLIT_LIST = "train_test_split/shuffled_{}_file_list.json"
LAYOUT = """\
shapenetcore_partanno_segmentation_benchmark_v0_normal/     data.root
  synsetoffset2category.txt                 16 lines "Airplane 02691156" (line = category id)
  train_test_split/shuffled_train_file_list.json   ["shape_data/02691156/<id>", ...]
  train_test_split/shuffled_val_file_list.json
  train_test_split/shuffled_test_file_list.json
  02691156/<id>.txt ...                     rows "x y z nx ny nz part" (part 0..49)
Published by the PointNet++ authors (Qi et al., Stanford) as
shapenetcore_partanno_segmentation_benchmark_v0_normal.zip (ShapeNet terms of use)."""


def read_shape(path: Path, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``x y z nx ny nz part`` -> (float32 (n, 6), int64 (n,)); errors name the line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the shape file ({e})") from None
    rows = text.split("\n")
    try:
        data = np.loadtxt(rows, dtype=np.float64, ndmin=2)  # blank lines skipped
    except ValueError:
        data = None
    if data is None or data.ndim != 2 or data.shape[1] != 7:
        for number, line in enumerate(rows, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 7:
                raise DataError(f"{path}, line {number}: {len(fields)} values; expected 7 "
                                f"('x y z nx ny nz part'): {line.strip()[:80]!r}")
            try:
                [float(f) for f in fields]
            except ValueError:
                raise DataError(f"{path}, line {number}: not numbers: {line.strip()[:80]!r}"
                                ) from None
        raise DataError(f"{path}: holds no points; expected rows 'x y z nx ny nz part'")
    bad = ~np.isfinite(data).all(axis=1)
    parts = SHAPENETPART_PARTS[category]
    label = data[:, 6]
    bad_label = (label != np.round(label)) | (label < parts[0]) | (label > parts[-1])
    for mask, what in ((bad, "NaN or inf"),
                       (bad_label, f"part label outside {category}'s parts "
                                   f"{parts[0]}..{parts[-1]}")):
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            number = [n for n, line in enumerate(rows, 1) if line.strip()][i]
            raise DataError(f"{path}, line {number}: {what}: {rows[number - 1].strip()[:80]!r}")
    return data[:, :6].astype(np.float32), label.astype(np.int64)


class ShapeNetPart(Dataset):
    """Items ``(points float32 (npoints, 3 | 6), category int, parts int64 (npoints,))``.

    ``split``: ``trainval`` (train + val, the official training set), ``test``, ``train``
    or ``val``. ``normals`` adds the normal columns after xyz (the official ``--normal``).
    Training splits draw a fresh subset every time an item is read (NumPy's global
    generator, seeded per loader worker by the engine); the test split draws one fixed
    subset per shape from ``seed`` (interpretation: the official test loader drew a random
    subset too, which made the metric vary from run to run).
    """

    def __init__(self, root: str | Path, split: str = "trainval", npoints: int = 2048,
                 normals: bool = False, seed: int = 0):
        if split not in SPLITS:
            raise DataError(f"ShapeNetPart split must be one of {sorted(SPLITS)}; got {split!r}")
        if isinstance(npoints, bool) or not isinstance(npoints, int) or npoints < 1:
            raise DataError(f"npoints must be a positive integer; got {npoints!r}")
        self.root = Path(root).expanduser()
        self.split, self.npoints, self.normals, self.seed = split, npoints, normals, seed
        self.resample = split != "test"
        catfile = self.root / "synsetoffset2category.txt"
        if not catfile.is_file():
            raise missing("ShapeNetPart category file", catfile, LAYOUT)
        self.synsets: dict[str, str] = {}
        for number, line in enumerate(catfile.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[0] not in SHAPENETPART_PARTS:
                raise DataError(f"{catfile}, line {number}: expected 'Category synset' with a "
                                f"category of {SHAPENETPART_CATEGORIES}; got {line.strip()!r}")
            self.synsets[fields[0]] = fields[1]
        self.class_names = list(self.synsets)
        ids = set()
        for part in SPLITS[split]:
            ids |= self._split_ids(part)
        self.files: list[tuple[int, Path]] = []
        for c, (name, synset) in enumerate(self.synsets.items()):
            folder = self.root / synset
            if not folder.is_dir():
                raise missing(f"ShapeNetPart folder of {name}", folder, LAYOUT)
            self.files += [(c, p) for p in sorted(folder.glob("*.txt")) if p.stem in ids]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _split_ids(self, part: str) -> set[str]:
        path = self.root / SPLIT_LIST.format(part)
        if not path.is_file():
            raise missing("ShapeNetPart split list", path, LAYOUT)
        try:
            entries = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a JSON list of 'shape_data/<synset>/<id>' ({e})"
                            ) from None
        if not isinstance(entries, list) or not all(
                isinstance(e, str) and e.count("/") == 2 for e in entries):
            raise DataError(f"{path}: expected a JSON list of 'shape_data/<synset>/<id>' strings")
        return {e.split("/")[2] for e in entries}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def shape(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole shape (xyz normalised to the unit sphere, then the normals if asked for)
        and its part labels; kept in memory (xyz and uint8 labels: about 35 kB a shape)."""
        if index not in self._cache:
            category, path = self.files[index]
            points, parts = read_shape(path, self.class_names[category])
            # the official pc_normalize: centroid subtracted, largest norm scaled to 1
            points[:, :3] = normalize_unit_sphere(torch.from_numpy(points[:, :3])).numpy()
            points = points if self.normals else np.ascontiguousarray(points[:, :3])
            self._cache[index] = points, parts.astype(np.uint8)
        return self._cache[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        points, parts = self.shape(index)
        rng = np.random if self.resample else np.random.default_rng((self.seed, index))
        choice = rng.choice(len(parts), self.npoints, replace=True)
        return (torch.from_numpy(points[choice]), self.files[index][0],
                torch.from_numpy(parts[choice].astype(np.int64)))

    def __repr__(self) -> str:
        return (f"ShapeNetPart({len(self)} shapes of {self.num_classes} categories, split "
                f"{self.split!r}, {self.npoints} points, from {self.root})")


class PartAugment:
    """The official training augmentation, on a batch ``(B, N, 3+)`` on any device: per cloud
    an isotropic scale ``U(scale_range)`` then a shift ``U(-shift_range, shift_range)`` per axis
    (``provider.random_scale_point_cloud`` then ``shift_point_cloud``); xyz only."""

    def __init__(self, scale_range=(0.8, 1.25), shift_range: float | None = 0.1):
        if scale_range is not None:
            lo, hi = (float(v) for v in scale_range)
            if not 0 < lo <= hi:
                raise DataError(f"scale_range must be [low, high] with 0 < low <= high; got "
                                f"{scale_range!r}")
        if shift_range is not None and float(shift_range) < 0:
            raise DataError(f"shift_range must be >= 0; got {shift_range!r}")
        self.scale_range, self.shift_range = scale_range, shift_range

    def __call__(self, points: torch.Tensor, generator=None) -> torch.Tensor:
        B = points.shape[0]
        xyz = points[..., :3]
        if self.scale_range is not None:
            lo, hi = self.scale_range
            r = torch.rand(B, 1, 1, generator=generator).to(points.device, points.dtype)
            xyz = xyz * (lo + (hi - lo) * r)
        if self.shift_range is not None:
            r = torch.rand(B, 1, 3, generator=generator).to(points.device, points.dtype)
            xyz = xyz + self.shift_range * (2 * r - 1)
        return torch.cat([xyz, points[..., 3:]], -1) if points.shape[-1] > 3 else xyz

    def __repr__(self) -> str:
        scale = (f"isotropic scale U({self.scale_range[0]}, {self.scale_range[1]})"
                 if self.scale_range is not None else "no scaling")
        shift = (f"shift U(-{self.shift_range}, {self.shift_range}) per axis"
                 if self.shift_range is not None else "no shift")
        return f"{scale}, then {shift}, per cloud"


def build_part_augment(cfg: dict, mode: str):
    """The train augmentation of a part-segmentation ``data`` section; identity otherwise."""
    if mode != "train":
        return lambda points, generator=None: points
    return PartAugment(cfg.get("scale_range", (0.8, 1.25)), cfg.get("shift_range", 0.1))


AUGMENT_KEYS = ("scale_range", "shift_range")
PART_DATASETS = ("shapenetpart", "synthetic_parts")


def part_protocol(cfg: dict) -> str:
    """One line naming the sampling and augmentation of a part-segmentation run."""
    augment = build_part_augment(cfg, "train")
    sampling = ("a random npoints-subset with replacement of each whole shape, drawn anew "
                "every epoch, one fixed draw per test shape" if cfg["name"] == "shapenetpart"
                else "synthetic shapes generated with npoints points")
    return (f"part segmentation: xyz on the unit sphere, {cfg.get('npoints', 2048)} points "
            f"({sampling}); train augmentation: {augment!r}; test: none")
SHAPENETPART_KEYS = ("root", "train_split", "test_split", "normals", "seed", *AUGMENT_KEYS)


def build_shapenetpart(cfg: dict, split: str) -> ShapeNetPart:
    """``split`` train | test -> the configured ``train_split`` (trainval) | ``test_split``."""
    name = cfg.get(f"{split}_split") or ("trainval" if split == "train" else "test")
    return ShapeNetPart(cfg.get("root") or "datasets/shapenetcore_partanno_segmentation_"
                        "benchmark_v0_normal", name, npoints=cfg.get("npoints", 2048),
                        normals=bool(cfg.get("normals", False)), seed=cfg.get("seed", 0))
