"""Tasks: what a run trains for. The engine owns the loop; a task owns the batch, the loss,
the test metrics and what "best" means.

The engine (`trainer.fit`, `evaluate.collect`) asks a task, in this order:

- `derive(datasets)`: model settings that follow from the data (e.g. `{"model": {"cls_dim":
  40}}`); recorded in the run's config under `derived:`, never written into the user's keys.
- `transform(mode)`: the batch transform for `"train"`, `"test"` or `"vote"`.
- `prepare(batch, device, transform)`: a loader batch -> `(inputs tuple, target)` on the device,
  transformed; the model is called as `model(*inputs)`.
- `loss(output, target)`: the training loss (the engine adds the adapter's regulariser).
- `train_counts(output, target)`: `(correct, total)` of the batch, for `train_acc`.
- `records(output, target, inputs)`: per-sample tensors kept for evaluation (first dim =
  batch); with voting, `output` is the mean over the views.
- `metrics(records, class_names)`: a dict holding at least every key of `log_metrics`
  (floats); other entries (tensors, dicts) are details kept in checkpoints.
- `details(metrics, class_names)`: the JSON-friendly details for `metrics.json` and `tools/test.py`.
- `figures(metrics, class_names, run_dir, title)`: end-of-run figures.
- `protocol()`: one line naming the sampling / preprocessing and augmentation, recorded with
  the results.

`best_metric` (a key of `log_metrics`, higher is better) picks `best.pth`. `log_metrics` are
the test columns of `log.csv` (`test_<key>`). A new task is one class with `@register_task`
and `datasets = ("data_name", ...)`: runs whose `data.name` is listed use it; every other
dataset is a classification run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pointclora.data.images import IMAGE_DATASETS, image_protocol

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task of the datasets it lists."""
    for other in TASKS.values():
        shared = set(other.datasets) & set(cls.datasets)
        if shared and other.name != cls.name:
            raise ValueError(f"datasets {sorted(shared)} already belong to task {other.name!r}")
    TASKS[cls.name] = cls
    return cls


def task_name(cfg: dict) -> str:
    """The task serving `cfg["data"]["name"]` (classification unless a task claims it)."""
    name = cfg["data"]["name"]
    for task in TASKS.values():
        if name in task.datasets:
            return task.name
    return ClassificationTask.name


def build_task(cfg: dict) -> Task:
    return TASKS[task_name(cfg)](cfg)


class Task:
    """The contract between the engine and a task (see the module docstring)."""

    name: ClassVar[str]
    datasets: ClassVar[tuple[str, ...]] = ()
    log_metrics: ClassVar[tuple[str, ...]]
    best_metric: ClassVar[str]

    def __init__(self, cfg: dict | None = None):
        self.cfg = cfg

    def derive(self, datasets: dict) -> dict:
        return {}

    def transform(self, mode: str) -> Callable:
        raise NotImplementedError

    def prepare(self, batch, device: torch.device, transform: Callable):
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_counts(self, output: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
        raise NotImplementedError

    def records(self, output: torch.Tensor, target: torch.Tensor, inputs: tuple) -> dict:
        raise NotImplementedError

    def metrics(self, records: dict, class_names: Sequence[str]) -> dict:
        raise NotImplementedError

    def details(self, metrics: dict, class_names: Sequence[str]) -> dict:
        return {}

    def protocol(self) -> str:
        """One line naming the sampling / preprocessing and augmentation, for the results."""
        raise NotImplementedError

    def random_backbone_outcome(self) -> str:
        """What to expect from adapters on a frozen, randomly initialised backbone (the
        warning a run without pretrained weights gives)."""
        return "results far below published numbers"

    def summary(self, metrics: dict) -> str:
        """One line for the log: the logged metrics."""
        return " ".join(f"{key} {metrics[key]:.2f}" for key in self.log_metrics)

    def figures(self, metrics: dict, class_names: Sequence[str], run_dir: Path,
                title: str) -> None:
        pass


def class_accuracies(confusion: np.ndarray) -> tuple[float, float, list[float | None]]:
    """(overall %, mean class % over the classes present, per-class % or None if absent)."""
    support, correct = confusion.sum(1), np.diag(confusion)
    overall = 100.0 * int(correct.sum()) / int(support.sum())
    per_class = [100.0 * int(c) / int(s) if s else None
                 for c, s in zip(correct, support, strict=True)]
    present = [a for a in per_class if a is not None]
    return overall, float(np.mean(present)), per_class


@register_task
class ClassificationTask(Task):
    """One label per sample: cross-entropy, overall accuracy (`acc`, picks the best epoch) and
    mean class accuracy (`macc`); batches are `(points or images, label)`."""

    name = "classification"
    log_metrics = ("acc", "macc")
    best_metric = "acc"

    def derive(self, datasets: dict) -> dict:
        """`model.cls_dim` from the data when the config leaves it null; a mismatch is an error."""
        num_classes = next(iter(datasets.values())).num_classes
        cls_dim = self.cfg["model"].get("cls_dim")
        if cls_dim is None:
            return {"model": {"cls_dim": num_classes}}
        if cls_dim != num_classes:
            raise ValueError(
                f"model.cls_dim is {cls_dim} but the dataset {self.cfg['data']['name']!r} has "
                f"{num_classes} classes; set model.cls_dim={num_classes} (or null to follow "
                "the data)")
        return {}

    def random_backbone_outcome(self) -> str:
        data = self.cfg["data"]
        measured = data["name"] == "modelnet40" and data.get("num_category", 40) == 40
        return ("accuracy far below published numbers, near chance on real data"
                + (" (3.45% measured on ModelNet40)" if measured else ""))

    def transform(self, mode: str) -> Callable:
        from pointclora.data import build_batch_transform

        return build_batch_transform(self.cfg["data"], mode)

    def protocol(self) -> str:
        from pointclora.data import protocol_description

        return protocol_description(self.cfg["data"])

    def prepare(self, batch, device, transform):
        inputs, labels = batch
        inputs = transform(inputs.to(device, non_blocking=True))
        return (inputs,), torch.as_tensor(labels).to(device, non_blocking=True)

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target)

    def train_counts(self, output, target):
        return (output.argmax(1) == target).sum().item(), target.numel()

    def records(self, output, target, inputs):
        return {"logits": output.float().cpu(), "label": target.cpu()}

    def metrics(self, records, class_names):
        from .plots import confusion_matrix

        logits, labels = records["logits"], records["label"]
        num_classes = max(len(class_names), logits.shape[1])
        matrix = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), num_classes)
        overall, mean_class, per_class = class_accuracies(matrix)
        return {"acc": overall, "macc": mean_class, "per_class_acc": per_class,
                "confusion": torch.from_numpy(matrix)}

    def details(self, metrics, class_names):
        """Per-class accuracy and sample count, and the confusion counts (from the matrix
        alone, so checkpoints written before `per_class_acc` existed give them too)."""
        matrix = np.asarray(metrics["confusion"])
        size = len(matrix)
        names = (list(class_names) if len(class_names) == size
                 else [f"class_{i}" for i in range(size)])
        per_class = class_accuracies(matrix)[2]
        return {"per_class_acc": {name: {"acc": acc, "samples": int(count)} for name, acc, count
                                  in zip(names, per_class, matrix.sum(1), strict=True)},
                "confusion": {"rows": "true class", "columns": "predicted class",
                              "classes": names, "counts": matrix.tolist()}}

    def summary(self, metrics):
        text = f"accuracy {metrics['acc']:.2f}%"
        return text + (f" (mean class {metrics['macc']:.2f}%)" if "macc" in metrics else "")

    def figures(self, metrics, class_names, run_dir, title):
        from .plots import plot_confusion

        plot_confusion(metrics["confusion"].numpy(), list(class_names),
                       Path(run_dir) / "confusion.png", title=title)


@register_task
class ImageClassificationTask(ClassificationTask):
    """Classification of images: each dataset item is already resized, cropped and normalised
    (in the loader workers, pointclora.data.images), so batches need no batch transform."""

    name = "image_classification"
    datasets = IMAGE_DATASETS

    def transform(self, mode: str) -> Callable:
        return _unchanged

    def protocol(self) -> str:
        return image_protocol(self.cfg["data"])


def _unchanged(batch: torch.Tensor) -> torch.Tensor:
    return batch


def forward(model: nn.Module, inputs: tuple, device: torch.device,
            dtype: torch.dtype | None) -> torch.Tensor:
    """`model(*inputs)` under autocast when `dtype` is set."""
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(*inputs)
