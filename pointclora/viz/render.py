"""Render point clouds to images without a display.

Open3D offers two renderers and each fails differently on headless machines:
`OffscreenRenderer` (Filament on EGL or Vulkan; needs mesa-vulkan-drivers or a GPU driver)
and the legacy `Visualizer` (OpenGL through GLFW; needs an X server, which Xvfb provides).
Both can abort the process instead of raising, so each is first tried in a throw-away
subprocess; the first that produces a non-blank image serves the whole run. When neither
works, a matplotlib scatter renderer takes over with a warning, so rendering never fails.
The chain is `BACKENDS`; `POINTCLORA_RENDER_BACKEND` or `backend=` pins one.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass

import numpy as np

BACKENDS = ("offscreen", "legacy", "matplotlib")
ENV_BACKEND = "POINTCLORA_RENDER_BACKEND"
BACKGROUND = (1.0, 1.0, 1.0)
DEFAULT_COLOR = (0.25, 0.45, 0.85)
UP_AXES = {"x": 0, "y": 1, "z": 2}

_chosen: str | None = None
_offscreen: dict = {}  # {(w, h): the one OffscreenRenderer}
_xvfb: subprocess.Popen | None = None


@dataclass(frozen=True)
class View:
    """Camera looking at the unit-normalised cloud from `azimuth`/`elevation` (degrees)."""

    up: str = "y"
    azimuth: float = 45.0
    elevation: float = 25.0
    fov: float = 30.0

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, towards-camera) unit vectors in world coordinates."""
        if self.up not in UP_AXES:
            raise ValueError(f"view up axis must be one of {sorted(UP_AXES)}, got {self.up!r}")
        u = UP_AXES[self.up]
        a, b = (u + 1) % 3, (u + 2) % 3  # (a, b, up) is a right-handed cyclic order
        az, el = np.radians(self.azimuth), np.radians(self.elevation)
        back = np.zeros(3)
        back[a], back[b], back[u] = np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)
        world_up = np.eye(3)[u]
        right = np.cross(world_up, back)
        right /= np.linalg.norm(right)
        return right, np.cross(back, right), back


def fit(points: np.ndarray, markers: np.ndarray | None = None):
    """Move the bounding box centre to the origin and scale its longest side to 2."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (N, 3) array, got shape {points.shape}")
    lo, hi = points.min(0), points.max(0)
    center, scale = (lo + hi) / 2.0, max(float((hi - lo).max()) / 2.0, 1e-9)
    if markers is not None:
        markers = (np.asarray(markers, dtype=np.float64).reshape(-1, 3) - center) / scale
    return (points - center) / scale, markers


def depth_shade(points: np.ndarray, colors: np.ndarray, view: View, strength: float = 0.45):
    """Darken far points so flat class colours still show the 3-D shape."""
    _, _, back = view.basis()
    depth = points @ back
    span = max(float(depth.max() - depth.min()), 1e-9)
    near = (depth - depth.min()) / span
    return colors * (1.0 - strength * (1.0 - near))[:, None]


def palette(n: int) -> np.ndarray:
    """`n` distinguishable RGB colours in [0, 1] (golden-ratio hue steps)."""
    from matplotlib.colors import hsv_to_rgb

    i = np.arange(n)
    hsv = np.stack([(i * 0.618033988749895) % 1.0, np.where(i % 2, 0.55, 0.75),
                    np.full(n, 0.95)], axis=-1)
    return hsv_to_rgb(hsv).reshape(n, 3)


def is_blank(image: np.ndarray, background=BACKGROUND, min_pixels: int = 20) -> bool:
    """True when fewer than `min_pixels` differ from the background or one colour fills it."""
    bg = np.round(np.asarray(background) * 255).astype(np.int16)
    flat = image.reshape(-1, image.shape[-1])[:, :3].astype(np.int16)
    foreground = int((np.abs(flat - bg).max(1) > 8).sum())
    return foreground < min_pixels or len(np.unique(flat, axis=0)) < 2


# --------------------------------------------------------------------------- backends


def _o3d_geometries(points, colors, markers, marker_color, marker_radius):
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(np.clip(colors, 0, 1).astype(np.float64))
    if markers is None or len(markers) == 0:
        return cloud, None
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=marker_radius, resolution=6)
    verts, tris = np.asarray(sphere.vertices), np.asarray(sphere.triangles)
    n, nv = len(markers), len(verts)
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector((markers[:, None] + verts[None]).reshape(-1, 3)),
        o3d.utility.Vector3iVector((tris[None] + nv * np.arange(n)[:, None, None]).reshape(-1, 3)),
    )
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.tile(marker_color, (n * nv, 1)))
    return cloud, mesh


def _camera(view: View, points: np.ndarray):
    _, up, back = view.basis()
    radius = float(np.linalg.norm(points, axis=1).max())
    distance = 1.05 * radius / np.sin(np.radians(view.fov) / 2.0)
    return back * distance, up


@contextlib.contextmanager
def _silenced():
    """Mute the banners Filament, GLFW and X print on stdout/stderr while a renderer starts
    (backends are probed first, so nothing useful is lost)."""
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _render_offscreen(points, colors, markers, size, point_size, view, marker_color, radius):
    from open3d.visualization import rendering

    renderer = _offscreen.get(size)
    if renderer is None:
        # Filament aborts when several renderers live at once: keep one, of the last size.
        _offscreen.clear()
        with _silenced():
            renderer = _offscreen[size] = rendering.OffscreenRenderer(*size)
        renderer.scene.view.set_post_processing(False)  # no tone mapping: exact colours
    scene = renderer.scene
    scene.clear_geometry()
    scene.set_background([*BACKGROUND, 1.0])
    cloud, mesh = _o3d_geometries(points, colors, markers, marker_color, radius)
    material = rendering.MaterialRecord()
    material.shader = "defaultUnlit"
    material.point_size = float(point_size)
    scene.add_geometry("cloud", cloud, material)
    if mesh is not None:
        scene.add_geometry("markers", mesh, material)
    eye, up = _camera(view, points)
    renderer.setup_camera(view.fov, [0.0, 0.0, 0.0], eye.tolist(), up.tolist())
    image = np.asarray(renderer.render_to_image())[..., :3].copy()
    scene.clear_geometry()  # a material still in use aborts Filament at exit
    return image


def _render_legacy(points, colors, markers, size, point_size, view, marker_color, radius):
    import open3d as o3d

    vis = o3d.visualization.Visualizer()
    with _silenced():
        created = vis.create_window(width=size[0], height=size[1], visible=False)
    if not created:
        raise RuntimeError("Open3D legacy Visualizer could not open a window (no X display?)")
    try:
        for geometry in _o3d_geometries(points, colors, markers, marker_color, radius):
            if geometry is not None:
                vis.add_geometry(geometry)
        option = vis.get_render_option()
        option.point_size = float(point_size)
        option.background_color = np.asarray(BACKGROUND)
        option.light_on = False
        control = vis.get_view_control()
        _, up, back = view.basis()
        control.set_lookat([0.0, 0.0, 0.0])
        control.set_front(back.tolist())
        control.set_up(up.tolist())
        control.set_zoom(0.7)
        vis.poll_events()
        vis.update_renderer()
        image = np.asarray(vis.capture_screen_float_buffer(do_render=True))
    finally:
        vis.destroy_window()
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _render_matplotlib(points, colors, markers, size, point_size, view, marker_color, radius):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    right, up, back = view.basis()
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, facecolor=BACKGROUND)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_facecolor(BACKGROUND)
    order = np.argsort(points @ back)  # painter's algorithm: far points first
    ax.scatter(points[order] @ right, points[order] @ up, c=np.clip(colors[order], 0, 1),
               s=point_size ** 2, linewidths=0)
    if markers is not None and len(markers):
        ax.scatter(markers @ right, markers @ up, c=[marker_color], s=(radius * size[0]) ** 2 / 2,
                   linewidths=0)
    lim = 1.05 * float(np.linalg.norm(points, axis=1).max())
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


_RENDERERS = {
    "offscreen": _render_offscreen,
    "legacy": _render_legacy,
    "matplotlib": _render_matplotlib,
}


# --------------------------------------------------------------------------- backend choice


def _display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def start_xvfb() -> bool:
    """Start a private Xvfb server and point DISPLAY at it; False if Xvfb is not installed."""
    global _xvfb
    if _display_available():
        return True
    exe = shutil.which("Xvfb")
    if exe is None:
        return False
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [exe, "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()  # Xvfb writes its display number once ready
    if not number:
        proc.terminate()
        return False
    _xvfb = proc
    atexit.register(_stop_xvfb)
    os.environ["DISPLAY"] = f":{number}"
    return True


def _stop_xvfb() -> None:
    if _xvfb is not None and _xvfb.poll() is None:
        _xvfb.terminate()
        _xvfb.wait(timeout=10)


_PROBE = """
import numpy as np, sys
sys.path.insert(0, {root!r})
from pointclora.viz import render
rng = np.random.default_rng(0)
pts = rng.uniform(-1, 1, (500, 3))
img = render._RENDERERS[{backend!r}](pts, np.tile([0.8, 0.1, 0.1], (500, 1)), pts[:3],
                                      (64, 64), 3.0, render.View(), (0.0, 0.0, 0.0), 0.05)
sys.exit(3 if render.is_blank(img) else 0)
"""


def probe(backend: str, timeout: float = 120.0) -> tuple[bool, str]:
    """Try `backend` in a subprocess (a broken GL stack may abort instead of raising)."""
    if backend == "matplotlib":
        return True, ""
    if backend == "legacy" and not _display_available() and not start_xvfb():
        return False, "no DISPLAY and no Xvfb to start (install xvfb)"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _PROBE.format(root=root, backend=backend)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if done.returncode == 0:
        return True, ""
    if done.returncode == 3:
        return False, "rendered a blank image"
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    return False, f"exit code {done.returncode}: {lines[-1] if lines else 'no message'}"


def select_backend(preference: str | None = None) -> str:
    """The first working backend of `BACKENDS` (or the pinned one); cached per process."""
    global _chosen
    preference = preference or os.environ.get(ENV_BACKEND) or "auto"
    if preference != "auto":
        if preference not in BACKENDS:
            raise ValueError(
                f"render backend must be 'auto' or one of {BACKENDS}, got {preference!r}"
            )
        if preference == "legacy" and not _display_available():
            start_xvfb()
        return preference
    if _chosen is None:
        failures = []
        for backend in BACKENDS:
            ok, why = probe(backend)
            if ok:
                _chosen = backend
                break
            failures.append(f"{backend}: {why}")
        if _chosen == "matplotlib":
            warnings.warn(
                "Open3D could not render headless (" + "; ".join(failures) + "); falling back "
                "to matplotlib scatter plots. Run scripts/install_system_deps.sh for "
                "EGL/Vulkan (mesa-vulkan-drivers) or Xvfb.",
                RuntimeWarning, stacklevel=2,
            )
    return _chosen


def _check_colors(colors, points: np.ndarray) -> np.ndarray:
    if colors is None:
        return np.tile(DEFAULT_COLOR, (len(points), 1))
    colors = np.asarray(colors, dtype=np.float64)
    if colors.shape != points.shape:
        raise ValueError(f"colors must have the points' shape {points.shape}, got {colors.shape}")
    return colors


def render_cloud(
    points: np.ndarray,
    colors: np.ndarray | None = None,
    *,
    markers: np.ndarray | None = None,
    size: tuple[int, int] = (320, 320),
    point_size: float = 3.0,
    view: View = View(),
    marker_color=(0.0, 0.0, 0.0),
    shade: bool = True,
    backend: str | None = None,
) -> np.ndarray:
    """RGB uint8 image (H, W, 3) of one cloud; `markers` (M, 3) are drawn as small spheres."""
    points, markers = fit(points, markers)
    colors = _check_colors(colors, points)
    if shade:
        colors = depth_shade(points, colors, view)
    name = select_backend(backend)
    return _RENDERERS[name](points, colors, markers, tuple(size), point_size, view,
                            np.asarray(marker_color, dtype=np.float64), 0.025)


def show_interactive(points, colors=None, markers=None, title: str = "PointCLoRA") -> None:
    """Open an Open3D window (needs a real display)."""
    if sys.platform.startswith("linux") and (_xvfb is not None or not _display_available()):
        raise RuntimeError("--show needs a display (DISPLAY/WAYLAND_DISPLAY is unset or is "
                           "our own invisible Xvfb); the PNGs are written without it")
    import open3d as o3d

    points, markers = fit(points, markers)
    colors = _check_colors(colors, points)
    geometries = [g for g in _o3d_geometries(points, colors, markers, np.zeros(3), 0.025)
                  if g is not None]
    o3d.visualization.draw_geometries(geometries, window_name=title)
