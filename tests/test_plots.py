"""Confusion-matrix figure: per-class counts, classes without test samples marked."""
import numpy as np
from PIL import Image

from pointclora.engine.plots import NO_SAMPLES_GREY, confusion_matrix, plot_confusion, row_labels


def test_row_labels_count_samples_and_name_empty_classes():
    labels = np.array([0, 0, 0, 2, 2, 3])
    preds = np.array([0, 1, 2, 2, 2, 0])
    matrix = confusion_matrix(labels, preds, 4)
    names = ["cone", "cube", "mug", "ring"]
    assert row_labels(matrix, names) == [
        f"{name} (n={(labels == k).sum()})" if (labels == k).any()
        else f"{name} (no test samples)" for k, name in enumerate(names)]
    assert row_labels(matrix, names)[1] == "cube (no test samples)"


def test_class_without_test_samples_is_greyed_out(tmp_path):
    def grey_pixels(matrix):
        plot_confusion(matrix, ["cone", "cube", "mug"], tmp_path / "cm.png")
        image = np.asarray(Image.open(tmp_path / "cm.png").convert("RGB")).astype(int)
        return int((np.abs(image - round(NO_SAMPLES_GREY * 255)).max(-1) <= 2).sum())

    full = confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), 3)
    empty_row = confusion_matrix(np.array([0, 2, 2]), np.array([0, 2, 1]), 3)
    assert grey_pixels(empty_row) > 2000 + grey_pixels(full)  # one whole row of cells
