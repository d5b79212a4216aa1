"""Pages of test samples: predictions, the worst mistakes, and the patches the model sees."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .pages import Tile, caption, class_legend, patch_colors, point_colors, save_page
from .render import View, render_cloud


@dataclass
class Predictions:
    """Per evaluated sample: dataset index, label, predicted class and its probability."""

    index: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray

    @classmethod
    def from_logits(cls, index, logits, labels) -> Predictions:
        """From (N, C) logits and (N,) labels (arrays or CPU tensors)."""
        logits = np.asarray(logits, dtype=np.float64)
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        pred = prob.argmax(-1)
        return cls(np.asarray(index), np.asarray(labels), pred,
                   np.take_along_axis(prob, pred[:, None], -1)[:, 0])

    @property
    def accuracy(self) -> float:
        return float((self.pred == self.label).mean() * 100.0) if len(self.label) else 0.0

    def lookup(self, index: int) -> tuple[int, float] | None:
        """(pred, confidence) of dataset item `index`, None when it was not evaluated."""
        where = np.flatnonzero(self.index == index)
        return (int(self.pred[where[0]]), float(self.confidence[where[0]])) if len(where) else None

    def worst_mistakes(self, k: int) -> np.ndarray:
        """Dataset indices of the `k` most confident wrong predictions, most confident first."""
        wrong = np.flatnonzero(self.pred != self.label)
        order = wrong[np.argsort(-self.confidence[wrong], kind="stable")]
        return self.index[order[:k]]


@dataclass
class GalleryStyle:
    """How tiles look: colouring, tile size in pixels, point size, camera, backend."""

    color: str = "correct"
    tile: int = 320
    point_size: float | None = None  # None: from the point count and tile size
    view: View = View()
    backend: str | None = None

    def size_for(self, n: int) -> float:
        """Sparse clouds get bigger points so that shapes stay readable."""
        if self.point_size is not None:
            return self.point_size
        return float(np.clip(3.0 * (1024 / max(n, 1)) ** 0.5, 2.0, 6.0) * self.tile / 320)


def sample_tiles(clouds: dict[int, np.ndarray], labels: dict[int, int], class_names,
                 style: GalleryStyle, predictions: Predictions | None = None) -> list[Tile]:
    """One tile per cloud (insertion order), coloured and titled by label/prediction."""
    tiles = []
    for index, points in clouds.items():
        label = labels[index]
        found = predictions.lookup(index) if predictions is not None else None
        pred, conf = found if found is not None else (None, None)
        colors = point_colors(len(points), label, pred, style.color, len(class_names))
        title, title_color = caption(class_names, label, pred, conf)
        image = render_cloud(points, colors, size=(style.tile, style.tile),
                             point_size=style.size_for(len(points)), view=style.view,
                             backend=style.backend)
        key = class_legend([label], class_names)[0] if style.color == "class" else None
        tiles.append(Tile(image, f"#{index} {title}", title_color, key))
    return tiles


def patch_tiles(clouds: dict[int, np.ndarray], groups: dict[int, tuple], labels: dict[int, int],
                class_names, style: GalleryStyle) -> list[Tile]:
    """The cloud in grey, each FPS/kNN patch in its own colour, patch centres in black."""
    tiles = []
    for index, points in clouds.items():
        neighborhood, center = groups[index]
        pts, colors, markers = patch_colors(points, neighborhood, center)
        image = render_cloud(pts, colors, markers=markers, size=(style.tile, style.tile),
                             point_size=style.size_for(len(points)), view=style.view,
                             backend=style.backend)
        G, S = neighborhood.shape[:2]
        title = f"#{index} {class_names[labels[index]]}\n{G} patches of {S}"
        tiles.append(Tile(image, title))
    return tiles


def page_legend(tiles: list[Tile], legend=()) -> list[tuple[tuple, str]]:
    """`legend` followed by the distinct keys of `tiles` (e.g. the classes shown), sorted."""
    keys = {t.key[1]: t.key for t in tiles if t.key is not None}
    return [*legend, *(keys[name] for name in sorted(keys))]


def write_pages(tiles: list[Tile], out_dir: Path, stem: str, per_page: int, ncols: int,
                heading: str, legend=()) -> list[Path]:
    """`stem_000.png`, `stem_001.png`, ... with `per_page` tiles each; each page's key shows
    `legend` and the keys of its own tiles."""
    if per_page < 1:
        raise ValueError(f"per_page must be positive, got {per_page}")
    pages = [tiles[i:i + per_page] for i in range(0, len(tiles), per_page)]
    return [save_page(page, out_dir / f"{stem}_{n:03d}.png", ncols=ncols,
                      heading=f"{heading} (page {n + 1}/{len(pages)})" if len(pages) > 1
                      else heading, legend=page_legend(page, legend))
            for n, page in enumerate(pages)]
