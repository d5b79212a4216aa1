"""Synthetic shapes: determinism, geometry of the surfaces, separability, speed, writers."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pointclora.data import SYNTHETIC_CLASSES, DataError, SyntheticShapes, build_dataset
from pointclora.data.synthetic import generate, write_modelnet40_layout

ROOT = Path(__file__).resolve().parents[1]


def by_class(name: str, **kw) -> torch.Tensor:
    c = SYNTHETIC_CLASSES.index(name)
    points, labels = generate(c + 1, kw.pop("samples_per_class", 8), kw.pop("npoints", 2048),
                              **kw)
    return points[labels == c]


def test_deterministic_per_seed_split_and_class():
    a, la = generate(8, 5, 256, seed=1)
    b, lb = generate(8, 5, 256, seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.dtype == torch.float32 and a.shape == (40, 256, 3)
    assert la.tolist() == [c for c in range(8) for _ in range(5)]
    test, _ = generate(8, 5, 256, seed=1, split="test")
    other, _ = generate(8, 5, 256, seed=2)
    assert not torch.allclose(a, test) and not torch.allclose(a, other)
    # each class has its own stream: more classes leave the first ones unchanged
    more, _ = generate(12, 5, 256, seed=1)
    assert torch.equal(more[:40], a)


def test_dataset_items_and_config():
    ds = build_dataset({"name": "synthetic", "num_classes": 10, "samples_per_class": 3,
                        "npoints": 128, "seed": 4, "noise": 0.0, "rotation": "so3"}, "test")
    assert isinstance(ds, SyntheticShapes) and len(ds) == 30
    assert ds.num_classes == 10 and ds.class_names == list(SYNTHETIC_CLASSES[:10])
    points, label = ds[29]
    assert points.shape == (128, 3) and points.dtype == torch.float32 and label == 9
    assert len(SYNTHETIC_CLASSES) >= 8
    with pytest.raises(DataError, match=f"1..{len(SYNTHETIC_CLASSES)}.*sphere, cube"):
        generate(len(SYNTHETIC_CLASSES) + 1, 1, 16)
    with pytest.raises(DataError, match="rotation"):
        generate(2, 1, 16, rotation="random")
    with pytest.raises(DataError, match="occlusion"):
        generate(2, 1, 16, occlusion=1.0)


def test_generation_is_cheap():
    generate(8, 2, 64)  # warm-up
    # CPU time of this process: robust to other jobs sharing the machine
    t = time.process_time()
    generate(8, 125, 1024)
    cpu = time.process_time() - t
    assert cpu < 3.0, f"1,000 clouds of 1,024 points took {cpu:.2f} s of CPU"


def test_surfaces_match_their_equations():
    opts = dict(noise=0.0, rotation="none", scale=(1.0, 1.0))
    # axis-aligned ellipsoid: a x^2 + b y^2 + c z^2 + d x + e y + f z = 1 fits exactly
    for cloud in by_class("sphere", **opts).double():
        design = torch.cat([cloud**2, cloud], 1)
        coef = torch.linalg.lstsq(design, torch.ones(len(cloud), 1, dtype=torch.double)).solution
        assert (design @ coef - 1).abs().max() < 1e-4 and (coef[:3] > 0).all()
    # box surface: every point has a coordinate on a face
    p = by_class("cube", **opts)
    centre = (p.amax(1, keepdim=True) + p.amin(1, keepdim=True)) / 2
    half = (p.amax(1, keepdim=True) - p.amin(1, keepdim=True)) / 2
    face = ((p - centre).abs() / half).amax(-1)
    assert torch.allclose(face, torch.ones(1), atol=1e-5)
    # torus about y: (sqrt(x^2 + z^2) - R)^2 + y^2 = r^2, with a uniform area density
    p = by_class("torus", samples_per_class=2, npoints=10000, **opts)
    p = p - (p.amax(1, keepdim=True) + p.amin(1, keepdim=True)) / 2  # centre of symmetry
    rho = p[..., [0, 2]].norm(dim=-1)
    R = (rho.amax(1, keepdim=True) + rho.amin(1, keepdim=True)) / 2
    r = (rho.amax(1, keepdim=True) - rho.amin(1, keepdim=True)) / 2
    assert torch.allclose((rho - R) ** 2 + p[..., 1] ** 2, r**2, atol=2e-3)
    outer = (rho > R).float().mean(1)
    expected = (torch.pi * R + 2 * r).squeeze(1) / (2 * torch.pi * R.squeeze(1))
    assert torch.allclose(outer, expected, atol=0.02)  # 4 standard errors
    # disc and ring are flat; the ring has a hole
    assert by_class("disc", **opts)[..., 1].abs().max() < 1e-6
    ring = by_class("ring", **opts)
    assert ring[..., 1].abs().max() < 1e-6 and ring.norm(dim=-1).amin() > 0.4


def test_rotation_modes():
    base = dict(noise=0.0, seed=7)
    none, _ = generate(8, 4, 256, rotation="none", **base)
    up, _ = generate(8, 4, 256, rotation="up", **base)
    so3, _ = generate(8, 4, 256, rotation="so3", **base)
    assert torch.allclose(up[..., 1], none[..., 1], atol=1e-6)  # turned about y only
    radial = lambda p: p[..., [0, 2]].norm(dim=-1)  # noqa: E731
    assert torch.allclose(radial(up), radial(none), atol=1e-5)
    assert not torch.allclose(up, none, atol=1e-2)
    assert torch.allclose(so3.norm(dim=-1), none.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(so3[..., 1], none[..., 1], atol=1e-2)
    # upright: without rotation the cone's apex is its highest point, on the axis
    cone = by_class("cone", noise=0.0, rotation="none")
    top = cone[torch.arange(len(cone)), cone[..., 1].argmax(1)]
    assert top[:, [0, 2]].norm(dim=-1).max() < 0.05


def test_occlusion_removes_part_of_each_surface():
    opts = dict(noise=0.0, rotation="none", samples_per_class=32, npoints=1024)
    full = by_class("sphere", **opts)
    cut = by_class("sphere", occlusion=0.6, **opts)
    assert cut.shape == full.shape

    def emptiest_octant(p):
        d = p - p.mean(1, keepdim=True)
        octant = (d > 0).long() @ torch.tensor([1, 2, 4])
        counts = torch.stack([(octant == k).float().mean(1) for k in range(8)], 1)
        return counts.amin(1)

    assert emptiest_octant(full).min() > 0.08  # about 1/8 each
    assert emptiest_octant(cut).mean() < 0.06


def d2_histograms(points: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Shape distribution D2 (Osada et al.): histogram of pairwise distances, scale-free."""
    g = torch.Generator().manual_seed(0)
    i = torch.randint(0, points.shape[1], (points.shape[0], 3000), generator=g)
    j = torch.randint(0, points.shape[1], (points.shape[0], 3000), generator=g)
    pick = lambda k: points.gather(1, k.unsqueeze(-1).expand(-1, -1, 3))  # noqa: E731
    d = (pick(i) - pick(j)).norm(dim=-1)
    d = d / d.amax(1, keepdim=True)
    h = torch.stack([torch.histc(x, bins, 0, 1) for x in d])
    return h / h.sum(1, keepdim=True)


def test_classes_differ_by_shape_not_by_size():
    C = 8
    train, ytr = generate(C, 40, 1024, seed=0)
    test, yte = generate(C, 40, 1024, seed=0, split="test")
    # an independent rotation-invariant descriptor separates the classes ...
    htr, hte = d2_histograms(train), d2_histograms(test)
    centroids = torch.stack([htr[ytr == c].mean(0) for c in range(C)])
    shape_acc = (torch.cdist(hte, centroids).argmin(1) == yte).float().mean().item()
    assert shape_acc > 0.8, shape_acc
    # ... while size alone is near chance
    size = lambda p: p.norm(dim=-1).amax(1)  # noqa: E731
    mean_size = torch.stack([size(train)[ytr == c].mean() for c in range(C)])
    size_acc = ((size(test)[:, None] - mean_size).abs().argmin(1) == yte).float().mean().item()
    assert size_acc < 0.3, size_acc
    clean, _ = generate(C, 40, 256, noise=0.0)
    assert (size(clean) >= 0.75 - 1e-5).all() and (size(clean) <= 1.0 + 1e-5).all()


def test_modelnet40_layout_is_read_by_the_real_loader(tmp_path):
    root = write_modelnet40_layout(tmp_path / "mn", num_classes=4, samples_per_class=2,
                                   npoints=150, seed=3)
    assert (root / "modelnet40_shape_names.txt").read_text().split() == [
        "sphere", "cube", "cylinder", "cone"]
    assert (root / "modelnet40_test.txt").read_text().split()[:2] == ["sphere_0003",
                                                                      "sphere_0004"]
    row = (root / "cube" / "cube_0001.txt").read_text().splitlines()[0].split(",")
    assert len(row) == 6
    ds = build_dataset({"name": "modelnet40", "root": str(root), "raw_points": 150}, "test")
    points, labels = generate(4, 2, 150, seed=3, split="test")
    for i in range(len(ds)):
        item, label = ds[i]
        assert label == labels[i]
        ref = points[i].numpy() - points[i].numpy().mean(0)
        ref /= np.linalg.norm(ref, axis=1).max()
        np.testing.assert_allclose(item.numpy(), ref, atol=1e-5)
    before = ds[0][0]
    with pytest.raises(FileExistsError, match="force"):
        write_modelnet40_layout(root, num_classes=4, samples_per_class=2, npoints=150)
    assert torch.equal(ds[0][0], before)
    write_modelnet40_layout(root, num_classes=4, samples_per_class=2, npoints=150, seed=4,
                            force=True)
    assert not torch.allclose(ds[0][0], before, atol=1e-2)
    (root / "modelnet40_test_1024pts_fps.dat").write_bytes(b"cache of the old files")
    with pytest.raises(FileExistsError, match="stale"):
        write_modelnet40_layout(root, num_classes=4, samples_per_class=2, npoints=150,
                                force=True)


def test_cli_writes_synthetic_layouts(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools/prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["synthetic", str(tmp_path / "s"), "--layout", "scanobjectnn",
                        "--variant", "obj_only", "--num-classes", "3",
                        "--samples-per-class", "2"]) == 0
    ds = build_dataset({"name": "scanobjectnn", "root": str(tmp_path / "s"),
                        "variant": "obj_only"}, "train")
    assert len(ds) == 6 and ds.points.shape[1] == 2048
    assert module.main(["synthetic", str(tmp_path / "s"), "--layout", "scanobjectnn",
                        "--variant", "obj_only"]) == 2  # exists: refused
