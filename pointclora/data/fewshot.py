"""ModelNet40 few-shot folds in Point-BERT's release format, and a generator for them.

A fold file `{way}way_{shot}shot/{fold}.pkl` holds `{'train': [...], 'test': [...]}` of
`(points float32 (N, 6), label in 0..way-1, original ModelNet40 label)`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import modelnet40 as mn
from .common import (
    DataError,
    PointClouds,
    check_points,
    dump_pickle,
    load_pickle,
    missing,
    normalize_unit_sphere,
    read_names,
    stack_xyz,
)

LAYOUT = """\
  ROOT/                         (data.root, e.g. datasets/ModelNetFewshot)
    5way_10shot/0.pkl ... 9.pkl
    5way_20shot/  10way_10shot/  10way_20shot/
"""


def fold_path(root: Path, way: int, shot: int, fold: int) -> Path:
    return Path(root) / f"{way}way_{shot}shot" / f"{fold}.pkl"


def available_folds(cfg: dict) -> list[int]:
    """Fold numbers present for the configured `way` and `shot` under `data.root`."""
    root, way, shot = _setting(cfg)
    folder = fold_path(root, way, shot, 0).parent
    if not folder.is_dir():
        raise missing(f"{way}-way {shot}-shot folds", folder, LAYOUT)
    return sorted(int(p.stem) for p in folder.glob("*.pkl") if p.stem.isdigit())


def _setting(cfg: dict) -> tuple[Path, int, int]:
    root = Path(cfg.get("root", "datasets/ModelNetFewshot")).expanduser()
    return root, int(cfg.get("way", 5)), int(cfg.get("shot", 10))


def build_fewshot(cfg: dict, split: str) -> PointClouds:
    """One split of one fold; labels are 0..way-1, names come from the original labels."""
    root, way, shot = _setting(cfg)
    fold = int(cfg.get("fold", 0))
    if not root.is_dir():
        raise missing("few-shot root (data.root)", root, LAYOUT)
    path = fold_path(root, way, shot, fold)
    if not path.is_file():
        raise missing(f"fold {fold} of {way}-way {shot}-shot", path, LAYOUT)
    obj = load_pickle(path)
    if not isinstance(obj, dict) or split not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: expected a dict with keys ['test', 'train'], found {keys}")
    entries = obj[split]
    bad = [i for i, e in enumerate(entries) if not (isinstance(e, (tuple, list)) and len(e) == 3)]
    if bad:
        raise DataError(f"{path}: {split} sample {bad[0]} is not (points, label, original "
                        "label)")
    source = f"{path} [{split}]"
    labels = torch.tensor([int(e[1]) for e in entries])
    out = (labels < 0) | (labels >= way)
    if out.any():
        i = int(out.nonzero()[0])
        raise DataError(f"{source}: label {int(labels[i])} of sample {i} is outside "
                        f"0..{way - 1} for a {way}-way fold")
    names = _names(cfg, root, entries, way, source)
    xyz = stack_xyz([e[0] for e in entries], source)
    check_points(xyz, source)
    return PointClouds(normalize_unit_sphere(xyz), labels, names, source)


def _names(cfg: dict, root: Path, entries, way: int, source: str) -> list[str]:
    """Class name of each few-shot label, from the original ModelNet40 labels."""
    table = (read_names(root / cfg["shape_names"]) if cfg.get("shape_names")
             else list(mn.MODELNET40_CLASSES))
    names: list[str | None] = [None] * way
    for label, original in {(int(e[1]), int(e[2])) for e in entries}:
        name = table[original] if 0 <= original < len(table) else f"class_{original}"
        if names[label] not in (None, name):
            raise DataError(f"{source}: label {label} stands for both {names[label]!r} and "
                            f"{name!r}")
        names[label] = name
    return [n or f"class_{i}" for i, n in enumerate(names)]


def _pool(root: Path, split: str, num_points: int, cache_dir: Path | None):
    """(labels, fetch(indices) -> arrays) of a ModelNet40 split, from its cache or txt files."""
    txt_root = mn._locate(root, f"modelnet40_{split}.txt", mn.TXT_FOLDER)
    cache = (cache_dir or txt_root or root) / mn.cache_name(split, num_points)
    if cache.is_file():
        points, labels = mn.load_cache(cache)
        return labels.numpy(), lambda idx: [np.asarray(points[i], np.float32) for i in idx]
    if txt_root is None:
        raise missing(f"ModelNet40 {split} cache or txt split list", root, mn.LAYOUT)
    paths, labels, _ = mn.split_files(txt_root, split)
    done: dict[int, np.ndarray] = {}  # folds share shapes: sample each file once

    def fetch(idx):
        todo = [int(i) for i in dict.fromkeys(idx) if int(i) not in done]
        if todo:
            arrays, _ = mn.fps_subsets([paths[i] for i in todo], num_points, progress=False)
            done.update(zip(todo, arrays, strict=True))
        return [done[int(i)] for i in idx]

    return labels, fetch


def make_folds(root: str | Path, out_dir: str | Path, ways=(5, 10), shots=(10, 20),
               folds: int = 10, query: int = 20, seed: int = 0, num_points: int = 8192,
               cache_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write few-shot folds from ModelNet40 (its FPS caches when present, else the txt files).

    Each fold draws `way` classes that have at least `shot` training and `query` test
    shapes, then `shot` support shapes per class from the train split and `query` query
    shapes per class from the test split. Seeded by (seed, way, shot, fold), so a fold
    does not change when other folds or settings are added.
    """
    root, out_dir = Path(root).expanduser(), Path(out_dir).expanduser()
    targets = [(w, s, f, fold_path(out_dir, w, s, f)) for w in ways for s in shots
               for f in range(folds)]
    existing = [t[3] for t in targets if t[3].exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} fold files); "
                              "pass --force to replace them")
    cache_dir = Path(cache_dir).expanduser() if cache_dir else None
    (train_y, train_fetch), (test_y, test_fetch) = (
        _pool(root, s, num_points, cache_dir) for s in ("train", "test"))
    written = []
    for way, shot, fold, path in targets:
        rng = np.random.default_rng([seed, way, shot, fold])
        eligible = [c for c in np.unique(train_y)
                    if (train_y == c).sum() >= shot and (test_y == c).sum() >= query]
        if len(eligible) < way:
            raise DataError(f"only {len(eligible)} classes have >= {shot} train and >= {query} "
                            f"test shapes; cannot draw a {way}-way fold")
        classes = rng.choice(eligible, way, replace=False)
        support = [rng.choice(np.flatnonzero(train_y == c), shot, replace=False) for c in classes]
        queries = [rng.choice(np.flatnonzero(test_y == c), query, replace=False) for c in classes]
        fold_data = {}
        for split, picks, y, fetch in (("train", support, train_y, train_fetch),
                                       ("test", queries, test_y, test_fetch)):
            idx = np.concatenate(picks)
            local = np.repeat(np.arange(way), [len(p) for p in picks])
            fold_data[split] = [(pts, int(lb), int(y[i]))
                                for pts, lb, i in zip(fetch(idx), local, idx, strict=True)]
        written.append(dump_pickle(fold_data, path, force))
    return written
