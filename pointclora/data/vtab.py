"""VTAB-1k in the folder layout of the ViT PEFT code (NOAH, GLoRA, ARC).

``<root>/<task>/{train800,val200,train800val200,test}.txt`` list ``<relative path> <label>``
per line, images under ``<root>/<task>/images/<split>/``. Hyper-parameters are tuned on
train800 / val200; the reported runs train on train800val200 and test on test.
"""
from __future__ import annotations

from pathlib import Path

from .common import DataError
from .images import ImageFiles, image_transform, missing_root, read_label_list, split_name

# The 19 tasks and their class counts, by group (VTAB's Natural / Specialized / Structured).
VTAB_GROUPS = {
    "natural": {"caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102,
                "oxford_iiit_pet": 37, "svhn": 10, "sun397": 397},
    "specialized": {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                    "diabetic_retinopathy": 5},
    "structured": {"clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                   "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18,
                   "smallnorb_ele": 9},
}
VTAB_TASKS = {task: n for group in VTAB_GROUPS.values() for task, n in group.items()}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
VTAB_KEYS = ("root", "task", "num_classes", "train_split", "test_split")
LAYOUT = """\
<root>/<task>/                  data.root, data.task (e.g. vtab-1k/cifar)
  train800.txt val200.txt train800val200.txt test.txt
                                lines '<relative image path> <label>'
  images/<split>/000000.jpg ... the images the lists name
"""
PUBLISHED = ("The VTAB-1k folders in this layout are published by the NOAH project "
             "(github.com/ZhangYuanhan-AI/NOAH, data/vtab-1k) and used by GLoRA and ARC; the "
             "original tasks come from VTAB (github.com/google-research/task_adaptation).")


def vtab_split(cfg: dict, split: str) -> str:
    """The VTAB list behind the engine's ``train`` / ``test`` (``train_split`` /
    ``test_split``: train800val200 / test by default), or a VTAB split named directly."""
    name = split_name({**cfg, "name": "vtab1k"}, split)
    if name not in VTAB_SPLITS:
        raise DataError(f"VTAB-1k splits are {VTAB_SPLITS}; got {name!r} for {split!r}")
    return name


def build_vtab1k(cfg: dict, split: str) -> ImageFiles:
    """``data.name: vtab1k``: task ``data.task`` under ``data.root``.

    A task outside the 19 (such as the digits test set) needs ``num_classes``, or takes
    1 + the largest label of its lists.
    """
    task = cfg.get("task")
    if not task:
        raise DataError(f"data.task must name the VTAB-1k task folder: one of "
                        f"{sorted(VTAB_TASKS)} (or your own task in that layout)")
    root = Path(cfg.get("root") or "datasets/vtab-1k").expanduser()
    folder = root / task
    name = vtab_split(cfg, split)
    list_file = folder / f"{name}.txt"
    if not list_file.is_file():
        raise missing_root(f"VTAB-1k list {name}.txt of task {task!r}", list_file, LAYOUT,
                           PUBLISHED)
    paths, labels, origins = read_label_list(list_file, folder)
    num_classes = cfg.get("num_classes") or VTAB_TASKS.get(task)
    if num_classes is None:
        lists = [folder / f"{s}.txt" for s in VTAB_SPLITS if (folder / f"{s}.txt").is_file()]
        num_classes = 1 + max(max(read_label_list(f, folder)[1]) for f in lists)
    elif task in VTAB_TASKS and num_classes != VTAB_TASKS[task]:
        raise DataError(f"data.num_classes={num_classes} but VTAB-1k {task} has "
                        f"{VTAB_TASKS[task]} classes")
    names = [str(i) for i in range(num_classes)]
    return ImageFiles(paths, labels, names, image_transform(cfg, split == "train"),
                      f"VTAB-1k {task} {name}", origins)
