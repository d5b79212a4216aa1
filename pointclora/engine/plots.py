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
    """Loss, train accuracy and every test metric (`test_*` columns), learning rate."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    tests = sorted({k for r in rows for k in r if k.startswith("test_")})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in rows])
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].plot(epochs, [r["train_acc"] for r in rows], label="train_acc")
    for key in tests:
        val = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if val:
            axes[1].plot(*zip(*val, strict=True), marker=".", label=key)
    axes[1].set(title="accuracy and test metrics (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(epochs, [r["lr"] for r in rows])
    axes[2].set(title="learning rate", xlabel="epoch", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NO_SAMPLES_GREY = 0.8


def row_labels(matrix: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """'chair (n=20)' per true class; 'chair (no test samples)' where its row is empty."""
    counts = np.asarray(matrix).sum(1)
    return [f"{name} (n={int(c)})" if c else f"{name} (no test samples)"
            for name, c in zip(class_names, counts, strict=True)]


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path,
                   title: str = "confusion matrix") -> None:
    """Row-normalised matrix with each class's sample count; classes without test samples
    are greyed out; every cell count is written only when the classes are few."""
    plt = _pyplot()
    n = len(class_names)
    counts = matrix.sum(1, keepdims=True)
    norm = np.ma.masked_where(np.broadcast_to(counts == 0, matrix.shape),
                              matrix / np.maximum(counts, 1))
    cmap = plt.get_cmap("Blues").with_extremes(bad=(NO_SAMPLES_GREY,) * 3)
    size = min(4 + 0.28 * n, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(norm, cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), row_labels(matrix, class_names), fontsize=7 if n > 20 else 9)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
