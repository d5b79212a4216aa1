"""ModelNet40 as the official code bases read it: resampled txt files, FPS caches, h5 files.

The cache `modelnet40_{split}_8192pts_fps.dat` is the official pickle
`[list of float32 (8192, 6), list of int32 (1,)]`, so caches built here and caches built
by Point-BERT / Point-MAE are interchangeable. Items are unit-sphere normalised xyz.
"""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .common import (
    DataError,
    PointClouds,
    as_labels,
    check_points,
    dump_pickle,
    first_indices,
    load_pickle,
    missing,
    normalize_unit_sphere,
    read_h5,
    read_names,
    stack_xyz,
)

MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair",
    "cone", "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar",
    "keyboard", "lamp", "laptop", "mantel", "monitor", "night_stand", "person", "piano",
    "plant", "radio", "range_hood", "sink", "sofa", "stairs", "stool", "table", "tent",
    "toilet", "tv_stand", "vase", "wardrobe", "xbox",
)

LAYOUT = """\
  ROOT/                                    (data.root, e.g. datasets/modelnet40_normal_resampled)
    modelnet40_shape_names.txt             40 class names, line index = label
    modelnet40_train.txt, modelnet40_test.txt   ids such as airplane_0001
    airplane/airplane_0001.txt ...         10,000 rows x,y,z,nx,ny,nz
    modelnet40_{train,test}_8192pts_fps.dat   optional official FPS caches
  or the h5 release (data.format: h5):
  ROOT/ply_data_{train,test}{0,1,...}.h5   keys data (n, 2048, 3), label (n, 1)
    shape_names.txt
"""

TXT_FOLDER, H5_FOLDER = "modelnet40_normal_resampled", "modelnet40_ply_hdf5_2048"


def cache_name(split: str, num_points: int = 8192, num_category: int = 40) -> str:
    """The official cache file name."""
    return f"modelnet{num_category}_{split}_{num_points}pts_fps.dat"


def read_txt(path: Path) -> np.ndarray:
    """One resampled shape file -> float32 (rows, columns).

    numpy >= 1.23 parses with a C reader; on this data it is as fast as the
    `np.fromstring` / split alternatives (see benchmarks/results/cache.md) and names the
    bad row of a truncated file.
    """
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except FileNotFoundError:
        raise missing("ModelNet40 shape file", path, LAYOUT) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: truncated or corrupt shape file ({e})") from None
    if arr.shape[0] == 0 or arr.shape[1] < 3:
        raise DataError(f"{path}: truncated or corrupt shape file (parsed shape {arr.shape}, "
                        "expected rows of x,y,z[,nx,ny,nz])")
    return arr


def _locate(root: Path, marker: str, subfolder: str) -> Path | None:
    """`root` or `root/subfolder`, whichever holds files matching `marker`."""
    for folder in (root, root / subfolder):
        if any(folder.glob(marker)):
            return folder
    return None


def _class_names(cfg_names, folders: Sequence[Path | None], root: Path,
                 num_category: int) -> list[str]:
    if cfg_names:
        path = Path(cfg_names) if Path(cfg_names).is_absolute() else root / cfg_names
        if not path.is_file():
            raise missing("class names file (data.shape_names)", path, LAYOUT)
        return read_names(path)
    for folder in folders:
        for name in (f"modelnet{num_category}_shape_names.txt", "shape_names.txt"):
            if folder is not None and (folder / name).is_file():
                return read_names(folder / name)
    if num_category == 40:
        return list(MODELNET40_CLASSES)
    raise missing(f"modelnet{num_category}_shape_names.txt", root, LAYOUT)


def split_files(root: Path, split: str, num_category: int = 40
                ) -> tuple[list[Path], np.ndarray, list[str]]:
    """(shape files, labels, class names) of one split of the txt layout, all checked."""
    names_file = root / f"modelnet{num_category}_shape_names.txt"
    list_file = root / f"modelnet{num_category}_{split}.txt"
    for f in (names_file, list_file):
        if not f.is_file():
            raise missing("ModelNet40 file", f, LAYOUT)
    names = read_names(names_file)
    index = {n: i for i, n in enumerate(names)}
    paths, labels = [], []
    for line_no, shape_id in enumerate(read_names(list_file), 1):
        cls = shape_id.rsplit("_", 1)[0]
        if cls not in index:
            raise DataError(f"{list_file}:{line_no}: id {shape_id!r} names class {cls!r}, "
                            f"which is not in {names_file.name}")
        paths.append(root / cls / f"{shape_id}.txt")
        labels.append(index[cls])
    absent = [p for p in paths if not p.is_file()]
    if absent:
        shown = ", ".join(str(p) for p in absent[:3]) + (" ..." if len(absent) > 3 else "")
        raise missing(f"{len(absent)} of {len(paths)} shape files listed in {list_file.name}",
                      shown, LAYOUT)
    return paths, np.array(labels, dtype=np.int64), names


class ModelNet40Files(Dataset):
    """Lazy reader of the txt layout: the first `num_points` rows of each file.

    This is what the official loader does without its FPS cache; the files are uniform
    resamplings, so the first rows are a uniform subset. Build the cache with
    `tools/prepare_data.py modelnet40 ROOT` for the official FPS subsets.
    """

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, class_names: Sequence[str],
                 num_points: int = 8192):
        self.paths = list(paths)
        self.labels = as_labels(labels, "ModelNet40 split list", len(class_names))
        self.class_names = list(class_names)
        self.num_points = num_points

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        rows = read_txt(path)
        if len(rows) < self.num_points:
            raise DataError(f"{path} (sample {index}): {len(rows)} rows, fewer than "
                            f"data.raw_points={self.num_points}")
        xyz = torch.from_numpy(rows[None, : self.num_points, :3].copy())
        check_points(xyz, f"{path} (sample {index})")
        return normalize_unit_sphere(xyz)[0], int(self.labels[index])


def load_cache(path: Path) -> tuple[list[np.ndarray], torch.Tensor]:
    """An official cache -> (per-shape arrays, labels (n,)), validated."""
    if not Path(path).is_file():
        raise missing("ModelNet40 cache", path, LAYOUT)
    obj = load_pickle(path)
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2
            and all(isinstance(o, (list, tuple)) for o in obj) and len(obj[0]) == len(obj[1])):
        raise DataError(f"{path}: not an official cache [list of points, list of labels] of "
                        "equal length")
    points, labels = obj
    sizes = np.array([np.size(lb) for lb in labels])
    if (sizes != 1).any():
        raise DataError(f"{path}: label of sample(s) {first_indices(sizes != 1)} is not a "
                        "single integer")
    return list(points), as_labels(np.array([np.ravel(lb)[0] for lb in labels]), str(path))


def _fill_padding(xyz: torch.Tensor, source: str) -> torch.Tensor:
    """Replace all-zero padding rows by repeats of the cloud's real points.

    Some h5 exports pad short clouds with (0, 0, 0); left in, the padding would become a
    spurious cluster (at the old origin) that FPS and the normalisation treat as geometry.
    """
    real = xyz.abs().sum(-1) > 0
    count = real.sum(1)
    if (count == 0).any():
        raise DataError(f"{source}: sample(s) {first_indices(count == 0)} hold only zeros")
    if bool(real.all()):
        return xyz
    order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
    pick = torch.arange(xyz.shape[1]).unsqueeze(0) % count.unsqueeze(1)
    idx = order.gather(1, pick)
    return xyz.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))


def _h5_files(cfg: dict, folder: Path, split: str) -> list[Path]:
    listed = cfg.get("h5_files")
    if listed:
        if not isinstance(listed, dict) or split not in listed:
            raise DataError(f"data.h5_files must map each split to a list of files, e.g. "
                            f"{{train: [a.h5], test: [b.h5]}}; got {listed!r}")
        names = [listed[split]] if isinstance(listed[split], str) else listed[split]
        return [Path(n) if Path(n).is_absolute() else folder / n for n in names]
    found = sorted(folder.glob(f"ply_data_{split}*.h5"),
                   key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not found:
        raise missing(f"ModelNet40 h5 files ply_data_{split}*.h5", folder, LAYOUT)
    return found


def _load_h5(cfg: dict, folder: Path, split: str, class_names: list[str]) -> PointClouds:
    clouds, labels = [], []
    for path in _h5_files(cfg, folder, split):
        arrays = read_h5(path, ("data", "label"), LAYOUT)
        data = arrays["data"]
        if data.ndim != 3 or data.shape[-1] < 3:
            raise DataError(f"{path}: 'data' has shape {data.shape}; expected (n, points, 3), "
                            "so sample 0 already has the wrong point dimensions")
        if len(arrays["label"]) != len(data):
            raise DataError(f"{path}: {len(data)} clouds but {len(arrays['label'])} labels")
        xyz = torch.from_numpy(data[..., :3].astype(np.float32))
        check_points(xyz, str(path))
        clouds.append(_fill_padding(xyz, str(path)))
        labels.append(as_labels(arrays["label"], str(path), len(class_names)))
    if len({c.shape[1] for c in clouds}) > 1:
        raise DataError(f"h5 files of split {split!r} hold different point counts: "
                        f"{[c.shape[1] for c in clouds]}")
    return PointClouds(normalize_unit_sphere(torch.cat(clouds)), torch.cat(labels),
                       class_names, f"ModelNet40 h5 {split} ({folder})")


def build_modelnet40(cfg: dict, split: str) -> Dataset:
    """ModelNet40 from `data.root`, choosing cache, txt or h5 by `data.format` (auto)."""
    root = Path(cfg.get("root", f"datasets/{TXT_FOLDER}")).expanduser()
    if not root.is_dir():
        raise missing("ModelNet40 root (data.root)", root, LAYOUT)
    fmt = cfg.get("format", "auto")
    num_category = int(cfg.get("num_category", 40))
    num_points = int(cfg.get("raw_points", 8192))
    txt_root = _locate(root, f"modelnet{num_category}_{split}.txt", TXT_FOLDER)
    h5_root = (root if cfg.get("h5_files") else _locate(root, f"ply_data_{split}*.h5", H5_FOLDER))
    cache_dir = Path(cfg["cache_dir"]).expanduser() if cfg.get("cache_dir") else (txt_root or root)
    cache = cache_dir / cache_name(split, num_points, num_category)
    if cfg.get("h5_files"):  # an explicit option wins over whatever else lies under root
        if fmt not in ("auto", "h5"):
            raise DataError(f"data.h5_files lists h5 files but data.format is {fmt!r}; set "
                            "data.format: h5 (or auto), or remove data.h5_files")
        fmt = "h5"
    if fmt == "auto":
        fmt = ("cache" if cache.is_file() else "txt" if txt_root else "h5" if h5_root else None)
        if fmt is None:
            raise missing(f"ModelNet40 {split} data (txt split list, cache or h5 files)", root,
                          LAYOUT)
    if fmt == "txt":
        if txt_root is None:
            raise missing(f"modelnet{num_category}_{split}.txt", root, LAYOUT)
        paths, labels, names = split_files(txt_root, split, num_category)
        return ModelNet40Files(paths, labels, names, num_points)
    if fmt not in ("cache", "h5"):
        raise DataError(f"data.format must be auto, cache, txt or h5; got {fmt!r}")
    names = _class_names(cfg.get("shape_names"), [txt_root, h5_root], root, num_category)
    if fmt == "h5":
        return _load_h5(cfg, h5_root or root, split, names)
    points, labels = load_cache(cache)
    if len(labels) and int(labels.max()) >= len(names):
        chosen = "data.format: cache" if cfg.get("format") == "cache" else (
            "data.format: auto (a cache is found first)")
        raise DataError(f"{cache}: labels go up to {int(labels.max())}, but there are "
                        f"{len(names)} class names; {chosen} picked this cache. Point "
                        "data.shape_names at its names, or pick the data you mean with "
                        "data.format, data.cache_dir or data.h5_files")
    xyz = stack_xyz(points, str(cache))
    check_points(xyz, str(cache))
    return PointClouds(normalize_unit_sphere(xyz), labels, names, str(cache))


def fps_subsets(paths: Sequence[Path], num_points: int, batch_size: int = 16,
                device: str | torch.device = "cpu", progress: bool = True,
                desc: str = "FPS") -> tuple[list[np.ndarray], dict]:
    """Read shape files and keep `num_points` rows of each by farthest point sampling.

    Files are parsed in a background thread while the previous batch is sampled; FPS
    starts at row 0 (the official numpy sampler started at a random row). Returns the
    per-shape float32 arrays (all columns) and timings in seconds.
    """
    from pointclora.ops import furthest_point_sample

    timing = {"parse_s": 0.0, "fps_s": 0.0}

    def parse(batch):
        t = time.perf_counter()
        rows = [read_txt(p) for p in batch]
        timing["parse_s"] += time.perf_counter() - t
        return rows

    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(1) as pool, tqdm(total=len(paths), desc=desc, unit="shape",
                                             disable=not progress) as bar:
        pending = pool.submit(parse, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            rows = pending.result()
            pending = pool.submit(parse, batches[i + 1]) if i + 1 < len(batches) else None
            t = time.perf_counter()
            for group in _same_shape_groups(rows):
                for j in group:
                    if len(rows[j]) < num_points:
                        raise DataError(f"{batch[j]}: {len(rows[j])} rows, fewer than the "
                                        f"{num_points} points to sample")
                stacked = np.stack([rows[j] for j in group])
                xyz = torch.from_numpy(stacked[..., :3]).to(device)
                # FPS semantics skip points near the origin; a shift keeps every row eligible.
                xyz = xyz - xyz.amin(1, keepdim=True) + 1.0
                idx = furthest_point_sample(xyz, num_points).cpu().numpy()
                picked = np.take_along_axis(stacked, idx[..., None], 1)
                for k, j in enumerate(group):
                    rows[j] = np.ascontiguousarray(picked[k])
            timing["fps_s"] += time.perf_counter() - t
            out.extend(rows)
            bar.update(len(batch))
    return out, timing


def _same_shape_groups(rows: list[np.ndarray]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.shape, []).append(i)
    return list(groups.values())


def build_cache(root: str | Path, split: str, out_dir: str | Path | None = None,
                num_points: int = 8192, num_category: int = 40, batch_size: int = 16,
                device: str | torch.device = "cpu", force: bool = False,
                progress: bool = True) -> dict:
    """Write the official FPS cache of one split; returns its path, size and timings."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise missing("ModelNet40 root", root, LAYOUT)
    txt_root = _locate(root, f"modelnet{num_category}_{split}.txt", TXT_FOLDER) or root
    out = Path(out_dir).expanduser() if out_dir else txt_root
    path = out / cache_name(split, num_points, num_category)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to rebuild it")
    paths, labels, _ = split_files(txt_root, split, num_category)
    start = time.perf_counter()
    points, timing = fps_subsets(paths, num_points, batch_size, device, progress,
                                 desc=f"modelnet{num_category} {split}")
    t = time.perf_counter()
    dump_pickle([points, [np.array([c], dtype=np.int32) for c in labels]], path, force)
    timing["write_s"] = time.perf_counter() - t
    return {"path": path, "shapes": len(points), "seconds": time.perf_counter() - start,
            **timing}
