"""Headless rendering, page layout and the visualisation tool on the synthetic set."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pointclora.config import load_config
from pointclora.data import build_batch_transform, build_dataset
from pointclora.engine.build import build_run_model
from pointclora.engine.checkpoint import model_payload, save_checkpoint
from pointclora.models import build_model
from pointclora.viz import (
    BACKENDS,
    GalleryStyle,
    Predictions,
    Tile,
    View,
    is_blank,
    page_legend,
    patch_colors,
    patch_legend,
    point_colors,
    render_cloud,
    sample_tiles,
    save_page,
    select_backend,
)
from pointclora.viz import render as render_mod

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.samples_per_class=3", "model.cls_dim=8"]  # 8 classes x 3 test clouds
RED, GREEN, BLUE = (0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.9)


def _three_clusters(view: View, n: int = 300):
    """Red cloud to the camera's left, blue to its right, green above: tests orientation."""
    right, up, _ = view.basis()
    rng = np.random.default_rng(0)
    blobs = [rng.normal(0, 0.08, (n, 3)) + offset for offset in (-right, right, up)]
    colors = [np.tile(c, (n, 1)) for c in (RED, BLUE, GREEN)]
    return np.concatenate(blobs), np.concatenate(colors)


def _centroid(image: np.ndarray, rgb) -> np.ndarray:
    """(x, y) pixel centroid of the pixels dominated by the channel of `rgb`."""
    img = image.astype(int)
    c = int(np.argmax(rgb))
    others = [i for i in range(3) if i != c]
    mask = (img[..., c] > 60) & (img[..., c] > img[..., others].max(-1) + 40)
    assert mask.sum() > 20, f"colour {rgb} not found in the image"
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _assert_oriented(image: np.ndarray) -> None:
    assert not is_blank(image)
    red, blue, green = (_centroid(image, c) for c in (RED, BLUE, GREEN))
    assert red[0] < image.shape[1] / 2 < blue[0]  # left / right as the camera sees them
    assert green[1] < min(red[1], blue[1])  # above (image rows grow downwards)


_RENDER_SCRIPT = """
import numpy as np
from pointclora.viz import View, render_cloud
data = np.load({inp!r})
image = render_cloud(data["pts"], data["cols"], size=(128, 96), view=View(up="z"), shade=False,
                     backend={backend!r})
np.save({out!r}, image)
"""


@pytest.mark.parametrize("backend", ["offscreen", "legacy"])
def test_open3d_backends_render_oriented_non_blank_images(backend, tmp_path):
    pts, cols = _three_clusters(View(up="z"))
    inp, out = tmp_path / "cloud.npz", tmp_path / "img.npy"
    np.savez(inp, pts=pts, cols=cols)
    # one backend per process: Open3D cannot switch window systems once initialised
    code = _RENDER_SCRIPT.format(inp=str(inp), out=str(out), backend=backend)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    if done.returncode != 0:
        ok, why = render_mod.probe(backend)
        if not ok:
            pytest.skip(f"{backend} renderer unavailable here: {why} "
                        "(scripts/install_system_deps.sh installs its libraries)")
        pytest.fail(f"{backend} works but the render failed:\n{done.stderr[-2000:]}")
    image = np.load(out)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    _assert_oriented(image)


def test_matplotlib_backend_renders_the_same_orientation():
    view = View(up="z")
    pts, cols = _three_clusters(view)
    image = render_cloud(pts, cols, size=(128, 96), view=view, shade=False, backend="matplotlib")
    assert image.shape == (96, 128, 3)
    _assert_oriented(image)


def test_render_in_process_with_the_chosen_backend():
    view = View(up="y", azimuth=30, elevation=10)
    pts, cols = _three_clusters(view)
    image = render_cloud(pts, cols, markers=pts[:5], size=(120, 120), view=view)
    _assert_oriented(image)
    assert select_backend() in BACKENDS


def test_backend_chain_falls_back_to_matplotlib_with_a_warning(monkeypatch):
    monkeypatch.setattr(render_mod, "_chosen", None)
    monkeypatch.delenv(render_mod.ENV_BACKEND, raising=False)
    tried = []

    def broken(backend, timeout=120.0):
        tried.append(backend)
        return backend == "matplotlib", "" if backend == "matplotlib" else "no GL"

    monkeypatch.setattr(render_mod, "probe", broken)
    with pytest.warns(RuntimeWarning, match="offscreen: no GL; legacy: no GL"):
        assert render_mod.select_backend() == "matplotlib"
    assert tried == ["offscreen", "legacy", "matplotlib"]
    monkeypatch.setenv(render_mod.ENV_BACKEND, "matplotlib")
    assert render_mod.select_backend() == "matplotlib"
    with pytest.raises(ValueError, match="render backend must be"):
        render_mod.select_backend("opengl")


def test_is_blank_detects_empty_and_flat_images():
    white = np.full((50, 50, 3), 255, np.uint8)
    assert is_blank(white)
    assert is_blank(np.full((50, 50, 3), 90, np.uint8))  # one colour filling everything
    few = white.copy()
    few[:2, :2] = (200, 0, 0)
    assert is_blank(few)  # 4 pixels: not a rendering
    some = white.copy()
    some[10:20, 10:20] = (200, 0, 0)
    assert not is_blank(some)


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        render_cloud(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="colors must have"):
        render_cloud(np.zeros((10, 3)), np.zeros((9, 3)))


def test_patch_colors_put_patches_back_on_the_cloud():
    cfg = load_config(ROOT / "configs/demo.yaml", SMALL)
    model = build_model({**cfg["model"], "pretrained": None})
    points = build_dataset(cfg["data"], "test")[0][0][None].float()
    neighborhood, center = (t[0].numpy() for t in model.group(points))
    cloud = points[0].numpy()
    pts, colors, markers = patch_colors(cloud, neighborhood, center)
    G, S = neighborhood.shape[:2]
    patches = pts[len(cloud):].reshape(G, S, 3)
    # every patch point is a cloud point, and each patch starts at its centre
    dist = np.linalg.norm(patches.reshape(-1, 1, 3) - cloud[None], axis=-1).min(1)
    assert dist.max() < 1e-5
    np.testing.assert_allclose(patches[:, 0], center, atol=1e-6)
    np.testing.assert_array_equal(markers, center)
    patch_cols = colors[len(cloud):].reshape(G, S, 3)
    assert (patch_cols == patch_cols[:, :1]).all()  # one colour per patch
    assert len(np.unique(patch_cols[:, 0], axis=0)) == G


def test_predictions_worst_mistakes_and_accuracy():
    logits = torch.tensor([[5.0, 0, 0], [0, 1.0, 0], [0, 0, 9.0], [2.0, 0, 0], [0, 3.0, 0]])
    labels = torch.tensor([0, 2, 1, 1, 1])
    pred = Predictions.from_logits([10, 11, 12, 13, 14], logits, labels)
    assert pred.accuracy == pytest.approx(40.0)
    assert pred.worst_mistakes(5).tolist() == [12, 13, 11]  # wrong only, most confident first
    assert pred.worst_mistakes(1).tolist() == [12]
    assert pred.lookup(14) == (1, pytest.approx(torch.tensor([0, 3.0, 0]).softmax(0)[1].item()))
    assert pred.lookup(99) is None


def _tool(argv, capsys):
    main = runpy.run_path(str(ROOT / "tools/visualize.py"))["main"]
    code = main(argv)
    return code, capsys.readouterr()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tool_shows_synthetic_samples_and_patches_without_checkpoint(tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "vis"
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--out", str(out), "--samples", "6",
            "--per-page", "4", "--tile", "96", "--patches", "--color", "class",
            *(x for s in SMALL for x in ("--set", s))]
    code, res = _tool(argv, capsys)
    assert code == 0, res.err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["patches_000.png", "patches_001.png", "samples_000.png",
                     "samples_001.png", "summary.json"]
    for name in names[:-1]:
        assert not is_blank(_png(out / name))
    summary = json.loads((out / "summary.json").read_text())
    dataset = build_dataset(load_config(ROOT / "configs/demo.yaml", SMALL)["data"], "test")
    assert len(summary["samples"]) == 6
    assert summary["labels"] == [int(dataset[i][1]) for i in summary["samples"]]
    assert "predictions" not in summary

    (out / "notes.txt").write_text("mine")
    code, res = _tool(argv, capsys)  # refuses to replace an earlier run silently
    assert code == 2 and "--overwrite" in res.err
    assert (out / "samples_000.png").is_file()
    monkeypatch.delenv("DISPLAY", raising=False)  # --show without a display: PNGs, a warning
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    code, res = _tool([*argv, "--overwrite", "--samples", "2", "--backend", "matplotlib",
                       "--show"], capsys)
    assert code == 0 and "--show needs a display" in res.err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "patches_000.png",
                                                     "samples_000.png", "summary.json"]


def test_tool_with_checkpoint_predictions_and_worst_mistakes(tmp_path, capsys):
    cfg = load_config(ROOT / "configs/demo.yaml", [*SMALL, "adapter.method=full"])
    torch.manual_seed(0)
    model, init = build_run_model(cfg)
    with torch.no_grad():  # a different head so that predictions are not one class
        for p in model.cls_head_finetune.parameters():
            p.normal_(0, 0.05)
    ckpt = tmp_path / "best.pth"
    save_checkpoint({"config": cfg, "method": "full", "epoch": 0,
                     **model_payload(model, cfg, init)}, ckpt)
    out = tmp_path / "vis"
    code, res = _tool(["--ckpt", str(ckpt), "--out", str(out), "--samples", "4",
                       "--per-page", "6", "--tile", "96"], capsys)
    assert code == 0, res.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == 24
    # independent forward pass of the same weights on the same (deterministic) test input
    dataset = build_dataset(cfg["data"], "test")
    points = torch.stack([dataset[i][0] for i in range(len(dataset))]).float()
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        prob = model.eval()(build_batch_transform(cfg["data"], "test")(points)).softmax(-1)
    conf, pred = prob.max(-1)
    assert summary["predictions"] == pred[summary["samples"]].tolist()
    assert summary["accuracy"] == pytest.approx((pred == labels).float().mean().item() * 100)
    worst = summary["worst_mistakes"]
    wrong = set(torch.nonzero(pred != labels).flatten().tolist())
    assert len(worst) == min(6, len(wrong)) >= 3 and set(worst) <= wrong
    shown = conf[worst]
    assert (shown[:-1] >= shown[1:] - 1e-6).all()  # most confident first
    rest = list(wrong - set(worst))
    assert not rest or conf[rest].max() <= shown.min() + 1e-6
    assert not is_blank(_png(out / "worst_mistakes.png"))
    assert not is_blank(_png(out / "samples_000.png"))


def _has_color(image: np.ndarray, rgb, tol: int = 14) -> bool:
    target = np.round(np.asarray(rgb) * 255)
    return bool((np.abs(image.astype(int) - target).max(-1) <= tol).any())


def test_page_legend_is_drawn_below_the_tiles_in_its_colours(tmp_path):
    blank = [Tile(np.full((160, 160, 3), 255, np.uint8), f"#{i} blank") for i in range(3)]
    legend = [*patch_legend(), ((0.1, 0.3, 0.9), "blue class"), ((0.9, 0.6, 0.1), "orange")]
    plain = _png(save_page(blank, tmp_path / "plain.png", ncols=3, heading="h"))
    keyed = _png(save_page(blank, tmp_path / "keyed.png", ncols=3, heading="h", legend=legend))
    extra = keyed.shape[0] - plain.shape[0]
    assert extra > 10 and keyed.shape[1] == plain.shape[1]
    strip = keyed[-extra:]  # the tiles are white: whatever is coloured here is the key
    for rgb, _ in legend:
        assert _has_color(strip, rgb), rgb
    assert not _has_color(plain, (0.1, 0.3, 0.9))


def test_patch_legend_names_the_colours_patch_pages_use():
    cloud = np.random.default_rng(0).normal(size=(50, 3))
    neighborhood = np.zeros((2, 4, 3))
    _, colors, _ = patch_colors(cloud, neighborhood, cloud[:2])
    legend = dict((text.split(":")[0], rgb) for rgb, text in patch_legend())
    np.testing.assert_allclose(colors[:50], np.tile(legend["grey"], (50, 1)))  # the cloud
    assert legend["black"] == tuple(render_mod.render_cloud.__kwdefaults__["marker_color"])


def test_class_colouring_puts_each_shown_class_in_the_page_legend():
    names = ["cube", "cone", "torus", "mug"]
    clouds = {i: np.random.default_rng(i).normal(size=(40, 3)) for i in (3, 5, 8)}
    labels = {3: 2, 5: 0, 8: 2}
    style = GalleryStyle(color="class", tile=48, backend="matplotlib")
    tiles = sample_tiles(clouds, labels, names, style)
    legend = page_legend(tiles, [((0, 0, 0), "fixed entry")])
    assert [text for _, text in legend] == ["fixed entry", "cube", "torus"]
    for rgb, name in legend[1:]:
        painted = point_colors(1, names.index(name), None, "class", len(names))[0]
        np.testing.assert_allclose(rgb, painted)
    assert page_legend(sample_tiles(clouds, labels, names, GalleryStyle(
        color="correct", tile=48, backend="matplotlib"))) == []
