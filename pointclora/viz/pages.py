"""Grids of rendered clouds with titles, and the colourings the tiles use.

Open3D cannot draw text offscreen, so each cloud is rendered alone and matplotlib lays the
images out with their titles (Agg canvas, no display needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .render import DEFAULT_COLOR, palette

CORRECT = (0.20, 0.65, 0.30)
WRONG = (0.85, 0.20, 0.15)
UNGROUPED = (0.80, 0.80, 0.80)
CENTRE = (0.0, 0.0, 0.0)  # render_cloud's default marker colour
COLOR_MODES = ("correct", "class")


@dataclass
class Tile:
    """One rendered cloud and its caption."""

    image: np.ndarray
    title: str
    color: tuple = (0.0, 0.0, 0.0)
    key: tuple[tuple, str] | None = None  # (colour, text) this tile adds to its page's legend


def point_colors(n: int, label: int, pred: int | None, mode: str, num_classes: int):
    """(n, 3) colours: green/red by correctness, or the true class's colour.

    Without a prediction, "correct" falls back to one neutral colour.
    """
    if mode not in COLOR_MODES:
        raise ValueError(f"color mode must be one of {COLOR_MODES}, got {mode!r}")
    if mode == "class":
        rgb = palette(num_classes)[label]
    elif pred is None:
        rgb = DEFAULT_COLOR
    else:
        rgb = CORRECT if pred == label else WRONG
    return np.tile(rgb, (n, 1))


def patch_colors(points: np.ndarray, neighborhood: np.ndarray, center: np.ndarray):
    """The cloud in grey under its patches coloured by group: (points, colors, markers).

    `neighborhood (G, S, 3)` holds centred patches as `model.group` returns them; adding
    `center (G, 3)` puts them back in place. Points shared by patches appear once per patch.
    """
    G, S, _ = neighborhood.shape
    patches = (neighborhood + center[:, None, :]).reshape(G * S, 3)
    colors = np.repeat(palette(G), S, axis=0)
    all_points = np.concatenate([points, patches])
    all_colors = np.concatenate([np.tile(UNGROUPED, (len(points), 1)), colors])
    return all_points, all_colors, center


def class_legend(labels, class_names) -> list[tuple[tuple, str]]:
    """(colour, name) of each class among `labels`, as `point_colors(mode="class")` paints it."""
    colors = palette(len(class_names))
    return [(tuple(colors[c]), class_names[c]) for c in sorted(set(int(x) for x in labels))]


def patch_legend() -> list[tuple[tuple, str]]:
    """What the colours of a patch page mean (`patch_colors`)."""
    return [(UNGROUPED, "grey: points in no patch"),
            (tuple(palette(1)[0]), "colour: one kNN patch each"),
            (CENTRE, "black: FPS patch centres")]


def correctness_legend() -> list[tuple[tuple, str]]:
    return [(CORRECT, "prediction right"), (WRONG, "prediction wrong")]


def caption(class_names, label: int, pred: int | None = None, confidence: float | None = None):
    """'true: chair' or 'true: chair / pred: table (0.87)' and its colour."""
    text = f"true: {class_names[label]}"
    if pred is None:
        return text, (0.0, 0.0, 0.0)
    text += f"\npred: {class_names[pred]}"
    if confidence is not None:
        text += f" ({confidence:.2f})"
    return text, CORRECT if pred == label else WRONG


def save_page(tiles: list[Tile], path: str | Path, ncols: int = 4, heading: str | None = None,
              dpi: int = 100, legend: list[tuple[tuple, str]] | None = None) -> Path:
    """Lay `tiles` out in a grid with their titles and write one PNG.

    `legend`: (RGB colour, text) entries drawn as a key in a strip below the grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not tiles:
        raise ValueError("save_page needs at least one tile")
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    h, w = tiles[0].image.shape[:2]
    lines = max(t.title.count("\n") + 1 for t in tiles)
    title_in, heading_in = 0.1 + 0.18 * lines, 0.45 if heading else 0.0
    widest = max((0.35 + 0.075 * len(text) for _, text in legend or ()), default=1.0)
    legend_cols = max(1, min(len(legend or ()), int(ncols * w / dpi / widest)))
    legend_in = 0.1 + 0.22 * -(-len(legend) // legend_cols) if legend else 0.0
    fig = Figure(figsize=(ncols * w / dpi, nrows * (h / dpi + title_in) + heading_in + legend_in),
                 dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    height = fig.get_figheight()
    if heading:
        fig.suptitle(heading, fontsize=13, y=1 - 0.08 / height, va="top")
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], linestyle="", marker="o", markersize=8, color=rgb,
                          markeredgecolor=rgb) for rgb, _ in legend]
        fig.legend(handles, [text for _, text in legend], loc="lower center",
                   ncol=legend_cols, fontsize=9, frameon=False, borderaxespad=0.1,
                   handletextpad=0.2, columnspacing=1.0)
    grid = fig.add_gridspec(nrows, ncols, left=0, right=1, bottom=legend_in / height,
                            top=1 - (heading_in + title_in) / height, wspace=0.02,
                            hspace=title_in / (h / dpi))
    for i, tile in enumerate(tiles):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        ax.imshow(tile.image)
        ax.set_axis_off()
        ax.set_title(tile.title, fontsize=9, color=tile.color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path
