"""Headless rendering of point clouds and prediction grids."""
from .render import BACKENDS, View, fit, is_blank, palette, render_cloud, select_backend

__all__ = ["BACKENDS", "View", "fit", "is_blank", "palette", "render_cloud", "select_backend"]
