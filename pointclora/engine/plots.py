"""End-of-run figures: training curves and the confusion matrix (matplotlib, Agg)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def plot_curves(rows: Sequence[dict], path: Path) -> None:
    """Loss, accuracy and learning rate against epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    val = [(r["epoch"], r["test_acc"]) for r in rows if r.get("test_acc") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in rows])
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].plot(epochs, [r["train_acc"] for r in rows], label="train")
    if val:
        axes[1].plot(*zip(*val, strict=True), marker=".", label="test")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(epochs, [r["lr"] for r in rows])
    axes[2].set(title="learning rate", xlabel="epoch", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path,
                   title: str = "confusion matrix") -> None:
    """Row-normalised matrix; every cell is labelled only when the classes are few."""
    plt = _pyplot()
    n = len(class_names)
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(4 + 0.28 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), class_names, fontsize=7 if n > 20 else 9)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
