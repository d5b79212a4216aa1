"""Image datasets: labelled file lists, a generic class-folder tree, seeded synthetic images.

Every image dataset yields ``(FloatTensor (3, size, size), int)`` after the transform of its
config (resize, crop, normalisation), and reports a bad file or label line by file and line.
The VTAB-1k and FGVC loaders (``vtab.py``, ``fgvc.py``) are file lists over this module.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataError, atomic_output

DOCS = "docs/images.md"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
# Normalisation of Google's original ImageNet-21k ViT weights (the papers'): inputs in [-1, 1].
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
TRANSFORMS = ("vtab", "fgvc", "none")
TRANSFORM_KEYS = ("img_size", "transform", "mean", "std")
# data.name of the image datasets (registered in build.py); the engine's image task serves them
IMAGE_DATASETS = ("vtab1k", "fgvc", "image_folder", "synthetic_images")
# (train_split, test_split) of the datasets whose lists name their splits
SPLIT_DEFAULTS = {"vtab1k": ("train800val200", "test"), "fgvc": ("train", "test")}


def split_name(cfg: dict, split: str) -> str:
    """The dataset's split behind the engine's ``train`` / ``test`` (``data.train_split`` /
    ``data.test_split``, defaults in SPLIT_DEFAULTS); any other name is taken as given."""
    train, test = SPLIT_DEFAULTS.get(cfg.get("name"), ("train", "test"))
    return {"train": cfg.get("train_split", train),
            "test": cfg.get("test_split", test)}.get(split, split)
TRANSFORM_TEXT = {
    "vtab": "Resize(({size}, {size}), bicubic), no augmentation",
    "fgvc": "train: Resize({resize}), RandomCrop({size}), horizontal flip; test: Resize({resize}), "
            "CenterCrop({size})",
    "none": "no resize ({size} px), no augmentation",
}


def missing_root(what: str, path: Path, layout: str, published: str) -> DataError:
    """The error for an absent folder or file: the expected layout and where it is published."""
    return DataError(f"{what} not found: {path}\nExpected layout:\n{layout.rstrip()}\n"
                     f"{published}\nSee {DOCS}.")


# ---- transforms ----------------------------------------------------------------------------

def image_transform(cfg: dict, train: bool) -> Callable:
    """PIL image or uint8 tensor (3, H, W) -> normalised float tensor (3, size, size).

    ``transform``: ``vtab`` (NOAH/GLoRA: Resize((size, size), bicubic), no augmentation),
    ``fgvc`` (VPT: Resize to 8/7 of size then RandomCrop + horizontal flip for training,
    CenterCrop for testing) or ``none`` (size must already match). ``mean``/``std`` follow
    the weights (0.5 for Google's original in21k file).
    """
    from torchvision.transforms import InterpolationMode, v2  # noqa: PLC0415

    size = int(cfg.get("img_size", 224))
    mode = cfg.get("transform", "vtab")
    mean, std = cfg.get("mean", DEFAULT_MEAN), cfg.get("std", DEFAULT_STD)
    for name, value in (("mean", mean), ("std", std)):
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            raise DataError(f"data.{name} must be a list of 3 numbers (RGB); got {value!r}")
    if mode == "vtab":
        steps = [v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC,
                           antialias=True)]
    elif mode == "fgvc":
        resize = round(size * 8 / 7)  # 256 for 224, as in VPT
        steps = [v2.Resize((resize, resize), antialias=True)]
        steps += ([v2.RandomCrop(size), v2.RandomHorizontalFlip()] if train
                  else [v2.CenterCrop(size)])
    elif mode == "none":
        steps = []
    else:
        raise DataError(f"data.transform must be one of {TRANSFORMS}; got {mode!r}")
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def image_protocol(cfg: dict) -> str:
    """One line naming the transform of an image run, for its results."""
    default = "none" if cfg.get("name") == "synthetic_images" else (
        "fgvc" if cfg.get("name") == "fgvc" else "vtab")
    mode = cfg.get("transform", default)
    size = int(cfg.get("img_size", 32 if default == "none" else 224))
    text = TRANSFORM_TEXT.get(mode, mode).format(size=size, resize=round(size * 8 / 7))
    splits = f"; train split {split_name(cfg, 'train')}, test split {split_name(cfg, 'test')}"
    return (f"{text}; normalised with mean {list(cfg.get('mean', DEFAULT_MEAN))}, std "
            f"{list(cfg.get('std', DEFAULT_STD))}{splits}")


# ---- datasets ------------------------------------------------------------------------------

def read_label_list(list_file: Path, image_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, origins) of ``<relative path> <label>`` lines.

    An origin is ``"file:line"`` for error messages. A malformed line, a negative or
    non-integer label and a listed file that does not exist raise :class:`DataError`
    naming the list file and the line.
    """
    try:
        lines = list_file.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{list_file}: not a text file ({e})") from None
    paths, labels, origins = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        where = f"{list_file}:{number}"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise DataError(f"{where}: expected '<relative image path> <label>' with a "
                            f"non-negative integer label; got {line.strip()!r}")
        path = image_dir / parts[0]
        if not path.is_file():
            raise DataError(f"{where}: image {path} does not exist")
        paths.append(path)
        labels.append(int(parts[1]))
        origins.append(where)
    return paths, labels, origins


class LabelledImages(Dataset):
    """Items ``(transform(load(i)), label)``; subclasses say how an image is loaded."""

    labels: Sequence[int]
    class_names: list[str]
    transform: Callable
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(index)), int(self.labels[index])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
                f"{self.source})")


class ImageFiles(LabelledImages):
    """Labelled image files read lazily with PIL (converted to RGB) and transformed.

    ``origins[i]`` says where item i was listed (``"train800.txt:17"``), so an unreadable
    image is reported with its file and line.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], class_names: Sequence[str],
                 transform: Callable, source: str, origins: Sequence[str] | None = None):
        if not paths:
            raise DataError(f"{source}: holds no images")
        n = len(class_names)
        bad = next((i for i, y in enumerate(labels) if not 0 <= y < n), None)
        if bad is not None:
            where = origins[bad] if origins else str(paths[bad])
            raise DataError(f"{where}: label {labels[bad]} is outside 0..{n - 1} "
                            f"({source} has {n} classes)")
        self.paths, self.labels = list(paths), list(labels)
        self.origins = list(origins) if origins else [str(p) for p in paths]
        self.class_names, self.transform, self.source = list(class_names), transform, source

    def load(self, index: int):
        """The RGB PIL image of item ``index`` (untransformed)."""
        from PIL import Image  # noqa: PLC0415

        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            origin = self.origins[index]
            where = "" if origin == str(path) else f" (listed at {origin})"
            raise DataError(f"{path}{where}: unreadable image ({type(e).__name__}: {e})") from None


class ImageTensors(LabelledImages):
    """Images held in memory as uint8 (N, 3, H, W), e.g. synthetic ones."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 transform: Callable, source: str):
        self.images, self.labels = images, labels.long()
        self.class_names, self.transform, self.source = list(class_names), transform, source

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


FOLDER_LAYOUT = """\
<root>/train/<class name>/<image>.jpg   data.root; one folder per class (sorted names =
<root>/test/<class name>/...            labels 0..C-1) in each split folder; other split
                                        folders: data.train_split / data.test_split
"""


def build_image_folder(cfg: dict, split: str) -> ImageFiles:
    """``data.name: image_folder``: torchvision's class-folder layout in one folder per split
    (``train_split`` / ``test_split``, ``train`` / ``test`` by default; ``.`` is the root
    itself, which then serves both splits only if both say so)."""
    root = Path(cfg.get("root") or "").expanduser()
    if not cfg.get("root") or not root.is_dir():
        raise missing_root("image folder", root, FOLDER_LAYOUT, "Any images sorted into one "
                           "folder per class work (the torchvision ImageFolder layout).")
    base = root / split_name(cfg, split)
    if not base.is_dir():
        raise missing_root(f"{split} split folder", base, FOLDER_LAYOUT, "Any images sorted "
                           "into one folder per class work (the torchvision ImageFolder layout).")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise missing_root("class folders", base, FOLDER_LAYOUT, "")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (base / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return ImageFiles(paths, labels, classes, image_transform(cfg, split == "train"),
                      f"image folder {base}")


# ---- synthetic images ----------------------------------------------------------------------

SYNTHETIC_IMAGE_CLASSES = ("disc", "ring", "h_stripes", "v_stripes", "diagonal", "antidiagonal",
                           "checker", "dots", "fine_h_stripes", "fine_v_stripes")
SPLIT_IDS = {"train": 0, "test": 1}


def _masks(kind: int, g: torch.Generator, S: int, size: int) -> torch.Tensor:
    """(S, size, size) foreground masks of class ``kind`` (random centre, radius, period and
    phase per image): two shapes and eight periodic textures told apart by orientation,
    layout and frequency."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    u = torch.rand(S, 5, 1, 1, generator=g)
    x, y = xx - (u[:, 0] - 0.5) * 0.4, yy - (u[:, 1] - 0.5) * 0.4
    radius = 0.4 + 0.3 * u[:, 2]
    fine = kind >= 8
    period = (0.2 + 0.05 * u[:, 3]) if fine else (0.45 + 0.15 * u[:, 3])

    def stripes(t: torch.Tensor) -> torch.Tensor:
        return ((t / period + u[:, 4]) % 1) < 0.5

    if kind == 0:
        return x**2 + y**2 < radius**2
    if kind == 1:
        return ((x**2 + y**2).sqrt() - radius).abs() < 0.15
    if kind == 6:
        return stripes(xx) ^ stripes(yy)
    if kind == 7:
        return stripes(xx) & stripes(yy)
    direction = {2: yy, 3: xx, 4: (xx + yy) / math.sqrt(2), 5: (xx - yy) / math.sqrt(2),
                 8: yy, 9: xx}[kind]
    return stripes(direction)


def generate_images(num_classes: int = 10, samples_per_class: int = 100, size: int = 32,
                    seed: int = 0, split: str = "train", noise: float = 0.1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (C * S, 3, size, size), int64 labels): a pattern per class in a random
    colour on a random background colour, plus Gaussian pixel noise. Each (seed, split,
    class) has its own random stream, so splits differ and a class's images do not depend
    on the class count."""
    if not 1 <= num_classes <= len(SYNTHETIC_IMAGE_CLASSES):
        raise DataError(f"synthetic image num_classes must be in 1..{len(SYNTHETIC_IMAGE_CLASSES)}"
                        f" ({', '.join(SYNTHETIC_IMAGE_CLASSES)}); got {num_classes}")
    if split not in SPLIT_IDS or samples_per_class < 1 or size < 8:
        raise DataError(f"split must be train or test, samples_per_class >= 1 and size >= 8; "
                        f"got {split!r}, {samples_per_class}, {size}")
    images = []
    for label in range(num_classes):
        state = np.random.SeedSequence([seed, SPLIT_IDS[split], label]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        S = samples_per_class
        mask = _masks(label, g, S, size).unsqueeze(1).float()  # (S, 1, H, W)
        fg, bg = torch.rand(S, 3, 1, 1, generator=g), torch.rand(S, 3, 1, 1, generator=g)
        fg = torch.where((fg - bg).abs() < 0.3, 1 - bg, fg)  # keep the pattern visible
        img = mask * fg + (1 - mask) * bg + noise * torch.randn(S, 3, size, size, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    return torch.cat(images), labels


SYNTHETIC_IMAGE_KEYS = ("num_classes", "samples_per_class", "seed", "noise")


def build_synthetic_images(cfg: dict, split: str) -> ImageTensors:
    """``data.name: synthetic_images``: ``generate_images`` at ``img_size`` pixels."""
    options = {k: cfg[k] for k in SYNTHETIC_IMAGE_KEYS if cfg.get(k) is not None}
    size = int(cfg.get("img_size", 32))
    images, labels = generate_images(size=size, split=split, **options)
    n = options.get("num_classes", 10)
    return ImageTensors(images, labels, SYNTHETIC_IMAGE_CLASSES[:n],
                        image_transform({"transform": "none", **cfg}, split == "train"),
                        f"synthetic images {split} (seed {options.get('seed', 0)})")


def write_vtab_layout(root: str | Path, task: str = "synthetic", num_classes: int = 10,
                      size: int = 32, seed: int = 0, noise: float = 0.1, n_train: int = 80,
                      n_val: int = 20, n_test: int = 50, force: bool = False) -> Path:
    """Write synthetic images as a VTAB-1k task folder ``root/<task>/`` (PNG files and the
    four list files, as NOAH's layout); returns the task folder. ``n_*`` are per class
    (80 / 20 per class for 10 classes give the real 800 / 200 split sizes)."""
    folder = Path(root).expanduser() / task
    lists = [folder / f"{s}.txt" for s in ("train800", "val200", "train800val200", "test")]
    existing = [p for p in lists if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists; pass --force (force=True) to "
                              "overwrite")
    from PIL import Image  # noqa: PLC0415

    pool, pool_labels = generate_images(num_classes, n_train + n_val, size, seed, "train", noise)
    test, test_labels = generate_images(num_classes, n_test, size, seed, "test", noise)
    per_class = torch.arange(len(pool)) % (n_train + n_val)
    train = per_class < n_train
    splits = {"train800": (pool[train], pool_labels[train]),
              "val200": (pool[~train], pool_labels[~train]),
              "train800val200": (pool, pool_labels), "test": (test, test_labels)}
    for (name, (images, labels)), list_file in zip(splits.items(), lists, strict=True):
        (folder / "images" / name).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (img, y) in enumerate(zip(images, labels.tolist(), strict=True)):
            rel = f"images/{name}/{i:06d}.png"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / rel)
            lines.append(f"{rel} {y}")
        with atomic_output(list_file, force=True) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    return folder
