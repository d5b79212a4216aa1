"""Headless rendering of point clouds and pages of predictions, mistakes and patches."""
from .gallery import GalleryStyle, Predictions, patch_tiles, sample_tiles, write_pages
from .pages import COLOR_MODES, Tile, caption, patch_colors, point_colors, save_page
from .render import (
    BACKENDS,
    View,
    fit,
    is_blank,
    palette,
    render_cloud,
    select_backend,
    show_interactive,
)

__all__ = [
    "BACKENDS",
    "COLOR_MODES",
    "GalleryStyle",
    "Predictions",
    "Tile",
    "View",
    "caption",
    "fit",
    "is_blank",
    "palette",
    "patch_colors",
    "patch_tiles",
    "point_colors",
    "render_cloud",
    "sample_tiles",
    "save_page",
    "select_backend",
    "show_interactive",
    "write_pages",
]
