"""The five FGVC datasets in VPT's json layout (CUB, NABirds, Flowers, Cars, Dogs).

``<root>/<dataset>/{train,val,test}.json`` each map a relative image path to a class id;
images lie under the dataset's image folder (``images/``, ``Images/`` or the dataset
folder itself, as in VPT's loaders). Class ids are made contiguous in the sorted order of
the ids of ``train.json`` (interpretation: VPT remapped each split by its own ids, which
agrees whenever every split holds every class).
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import DataError
from .images import ImageFiles, image_transform, missing_root, split_name

# dataset folder -> (classes, image folder inside it, relative to which the json paths are)
FGVC_DATASETS = {
    "CUB_200_2011": (200, "images"),
    "NABirds": (555, "images"),
    "OxfordFlowers": (102, ""),
    "StanfordCars": (196, ""),
    "StanfordDogs": (120, "Images"),
}
FGVC_SPLITS = ("train", "val", "trainval", "test")
FGVC_KEYS = ("root", "dataset", "num_classes", "train_split", "test_split")
LAYOUT = """\
<root>/<dataset>/               data.root, data.dataset (e.g. fgvc/CUB_200_2011)
  train.json val.json test.json {"<relative image path>": <class id>, ...}
  images/... (CUB_200_2011, NABirds), Images/... (StanfordDogs),
  or paths relative to <dataset>/ (OxfordFlowers, StanfordCars)
"""
PUBLISHED = ("The json splits are published with VPT (github.com/KMnP/vpt, 'Datasets'); the "
             "images come from each dataset's own page (Caltech-UCSD Birds-200-2011, NABirds "
             "(Cornell Lab), Oxford 102 Flowers (VGG), Stanford Cars, Stanford Dogs).")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise missing_root(f"FGVC split file {path.name}", path, LAYOUT, PUBLISHED)
    try:
        anno = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid json ({e})") from None
    if not isinstance(anno, dict) or not anno:
        raise DataError(f"{path}: expected a non-empty json object "
                        "{\"<image path>\": <class id>}")
    for key, value in anno.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{path}: entry {key!r} has class id {value!r}; expected an integer")
    return anno


def build_fgvc(cfg: dict, split: str) -> ImageFiles:
    """``data.name: fgvc``; ``train_split`` (train | trainval) and ``test_split``
    (test | val) give the engine's ``train`` / ``test``."""
    dataset = cfg.get("dataset")
    if dataset not in FGVC_DATASETS:
        raise DataError(f"data.dataset must be one of {sorted(FGVC_DATASETS)}; got {dataset!r}")
    name = split_name({**cfg, "name": "fgvc"}, split)
    if name not in FGVC_SPLITS:
        raise DataError(f"FGVC splits are {FGVC_SPLITS}; got {name!r} for {split!r}")
    folder = Path(cfg.get("root") or "datasets/fgvc").expanduser() / dataset
    known, image_dir = FGVC_DATASETS[dataset]
    class_ids = sorted(set(_read_json(folder / "train.json").values()))
    num_classes = cfg.get("num_classes") or known
    if len(class_ids) != num_classes:
        raise DataError(f"{folder / 'train.json'} holds {len(class_ids)} class ids but "
                        f"{dataset} has {num_classes} classes (set data.num_classes for a "
                        "subset)")
    contiguous = {c: i for i, c in enumerate(class_ids)}
    paths, labels, origins = [], [], []
    for part in (("train", "val") if name == "trainval" else (name,)):
        path = folder / f"{part}.json"
        for rel, cid in _read_json(path).items():
            where = f"{path} entry {rel!r}"
            if cid not in contiguous:
                raise DataError(f"{where}: class id {cid} does not occur in train.json")
            image = folder / image_dir / rel
            if not image.is_file():
                raise DataError(f"{where}: image {image} does not exist")
            paths.append(image)
            labels.append(contiguous[cid])
            origins.append(where)
    return ImageFiles(paths, labels, [str(c) for c in class_ids],
                      image_transform({"transform": "fgvc", **cfg}, split == "train"),
                      f"FGVC {dataset} {name}", origins)
