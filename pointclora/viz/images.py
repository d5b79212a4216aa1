"""Tiles of dataset images titled with their true and predicted labels (image runs)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .gallery import Predictions
from .pages import Tile, caption


def image_array(image) -> np.ndarray:
    """uint8 (H, W, 3) of a PIL image or a uint8 tensor (3, H, W), as a dataset loads them."""
    if hasattr(image, "permute"):  # a torch tensor (3, H, W)
        return image.permute(1, 2, 0).cpu().numpy()
    return np.asarray(image.convert("RGB"))


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` scaled to fit a white ``size`` x ``size`` square (nearest neighbour for
    upscaling, so small images keep their pixels)."""
    from PIL import Image  # noqa: PLC0415

    h, w = image.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    method = Image.NEAREST if scale >= 1 else Image.BICUBIC
    resized = np.asarray(Image.fromarray(image).resize(new, method))
    out = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - new[1]) // 2, (size - new[0]) // 2
    out[top:top + new[1], left:left + new[0]] = resized
    return out


def image_tiles(dataset, indices: Sequence[int], class_names,
                predictions: Predictions | None = None, size: int = 320) -> list[Tile]:
    """One tile per dataset item (``dataset.load(i)``: the image before normalisation),
    captioned ``true`` / ``pred (confidence)`` in green or red."""
    tiles = []
    for index in indices:
        label = int(dataset.labels[index])
        found = predictions.lookup(int(index)) if predictions is not None else None
        pred, conf = found if found is not None else (None, None)
        title, color = caption(class_names, label, pred, conf)
        image = letterbox(image_array(dataset.load(int(index))), size)
        tiles.append(Tile(image, f"#{int(index)} {title}", color))
    return tiles
