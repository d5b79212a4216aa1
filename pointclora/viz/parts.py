"""Part-segmentation pages: ground truth and prediction side by side, parts coloured."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .gallery import GalleryStyle
from .pages import CORRECT, WRONG, Tile
from .render import palette, render_cloud

MAX_PARTS = 6  # the most parts of one ShapeNetPart category (Motorbike)


def part_colors(parts: np.ndarray, first_label: int) -> np.ndarray:
    """(n, 3) colours by part within the category: its k-th part gets colour k."""
    return palette(MAX_PARTS)[np.clip(np.asarray(parts) - first_label, 0, MAX_PARTS - 1)]


def part_legend(count: int = MAX_PARTS) -> list[tuple[tuple, str]]:
    return [(tuple(rgb), f"part {k + 1} of the category") for k, rgb in
            enumerate(palette(MAX_PARTS)[:count])]


def part_tiles(clouds: Mapping[int, np.ndarray], categories: Mapping[int, int],
               truth: Mapping[int, np.ndarray], parts: Mapping[str, Sequence[int]],
               style: GalleryStyle, predictions: Mapping[int, np.ndarray] | None = None,
               ious: Mapping[int, float] | None = None) -> list[Tile]:
    """Per shape a ground-truth tile, then (with ``predictions``) the prediction's tile
    titled with the shape IoU (green from 0.8 up, red below)."""
    names = list(parts)
    tiles = []
    for index, points in clouds.items():
        name = names[categories[index]]
        first = parts[name][0]
        views = [("ground truth", truth[index], (0.0, 0.0, 0.0))]
        if predictions is not None:
            iou = ious[index]
            views.append((f"prediction, IoU {100 * iou:.1f}", predictions[index],
                          CORRECT if iou >= 0.8 else WRONG))
        for what, labels, color in views:
            image = render_cloud(points, part_colors(labels, first),
                                 size=(style.tile, style.tile),
                                 point_size=style.size_for(len(points)), view=style.view,
                                 backend=style.backend)
            tiles.append(Tile(image, f"#{index} {name}\n{what}", color))
    return tiles
