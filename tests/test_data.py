"""Dataset loaders, cache builder, few-shot folds and batch transforms.

Real ModelNet40 files (`shared_data`) are the reference wherever a format is involved;
geometry is checked against independent numpy code (brute-force FPS, the normalisation
formula) rather than against the package's own helpers.
"""
import importlib.util
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pointclora import ops
from pointclora.data import (
    MODELNET40_CLASSES,
    SCANOBJECTNN_CLASSES,
    DataError,
    build_batch_transform,
    build_dataset,
    protocol_description,
)
from pointclora.data import modelnet40 as mn
from pointclora.data.fewshot import make_folds
from pointclora.data.synthetic import write_modelnet40_layout, write_scanobjectnn_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mini(shared_data) -> Path:
    return shared_data / "modelnet40_normal_resampled_mini"


def prepare_data_main():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools/prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def unit_sphere(xyz: np.ndarray) -> np.ndarray:
    c = xyz - xyz.mean(0)
    return c / np.sqrt((c**2).sum(1)).max()


def split_ids(root: Path, split: str) -> list[str]:
    return (root / f"modelnet40_{split}.txt").read_text().split()


def reference_fps(xyz: np.ndarray, k: int, skip_origin: bool = True) -> np.ndarray:
    """pointnet2_ops semantics in float64: start at 0, ties to the lower index."""
    xyz = xyz.astype(np.float64)
    dist = np.full(len(xyz), 1e10)
    eligible = (xyz**2).sum(1) > 1e-3 if skip_origin else np.ones(len(xyz), bool)
    idx = [0]
    for _ in range(k - 1):
        dist = np.minimum(dist, ((xyz - xyz[idx[-1]]) ** 2).sum(1))
        idx.append(int(np.argmax(np.where(eligible, dist, -1.0))))
    return np.array(idx)


def row_index(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Position of each row of `rows` in `table` (exact match), -1 when absent."""
    lookup = {r.tobytes(): i for i, r in reversed(list(enumerate(table)))}
    return np.array([lookup.get(r.tobytes(), -1) for r in rows])


# ---- ModelNet40: txt layout on the real files ---------------------------------------------

def test_modelnet40_txt_labels_follow_official_lists(mini):
    names = (mini / "modelnet40_shape_names.txt").read_text().split()
    assert names == list(MODELNET40_CLASSES)
    for split, count in (("train", 127), ("test", 29)):
        ds = build_dataset({"name": "modelnet40", "root": str(mini)}, split)
        ids = split_ids(mini, split)
        assert len(ds) == len(ids) == count
        assert ds.num_classes == 40 and ds.class_names == names
        got = [ds.class_names[int(label)] for label in ds.labels]
        assert got == [i.rsplit("_", 1)[0] for i in ids]


def test_modelnet40_txt_items_are_normalised_xyz_including_placeholder_normals(mini):
    ds = build_dataset({"name": "modelnet40", "root": str(mini)}, "train")
    ids = split_ids(mini, "train")
    for shape_id in ("sofa_0469", ids[0], ids[-1]):
        i = ids.index(shape_id)
        raw = np.loadtxt(mini / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt", delimiter=",")
        points, label = ds[i]
        assert points.dtype == torch.float32 and points.shape == (8192, 3)
        assert isinstance(label, int) and ds.class_names[label] == shape_id.rsplit("_", 1)[0]
        np.testing.assert_allclose(points.numpy(), unit_sphere(raw[:8192, :3]), atol=2e-6)
        assert abs(points.norm(dim=1).max().item() - 1) < 1e-6
    # The real release has rows with the placeholder normal (1, 1, 1): xyz is still used.
    raw = np.loadtxt(mini / "sofa/sofa_0469.txt", delimiter=",")
    rows = np.flatnonzero((raw[:8192, 3:] == 1).all(1))
    assert len(rows) > 0
    points, _ = ds[ids.index("sofa_0469")]
    np.testing.assert_allclose(points[rows].numpy(), unit_sphere(raw[:8192, :3])[rows], atol=2e-6)


# ---- ModelNet40: the official FPS cache ---------------------------------------------------

def test_cache_built_from_real_files_is_official_fps_pickle(mini, tmp_path):
    report = mn.build_cache(mini, "test", tmp_path, num_points=512, progress=False)
    path = tmp_path / "modelnet40_test_512pts_fps.dat"
    assert report["path"] == path and report["shapes"] == 29
    assert not list(tmp_path.glob(".*.tmp"))
    with open(path, "rb") as f:
        points, labels = pickle.load(f)  # plain pickle, as the official loader reads it
    assert isinstance(points, list) and isinstance(labels, list) and len(points) == 29
    ids = split_ids(mini, "test")
    for shape_id, pts, label in zip(ids, points, labels, strict=True):
        assert pts.dtype == np.float32 and pts.shape == (512, 6)
        assert label.dtype == np.int32 and label.shape == (1,)
        assert MODELNET40_CLASSES[label[0]] == shape_id.rsplit("_", 1)[0]
    # Rows are rows of the source file, chosen by farthest point sampling from row 0.
    for k in (0, 17):
        cls = ids[k].rsplit("_", 1)[0]
        raw = np.loadtxt(mini / cls / f"{ids[k]}.txt", delimiter=",", dtype=np.float32)
        picked = row_index(points[k], raw)
        assert (picked >= 0).all() and len(set(picked)) == 512
        ref = reference_fps(raw[:, :3], 512, skip_origin=False)
        agree = np.argmax(np.append(picked != ref, True))
        assert agree >= 100, f"FPS order diverges from the reference at step {agree}"
        xyz = raw[:, :3].astype(np.float64)
        # Each pick is (up to float32 rounding) the farthest point from the earlier picks.
        d = np.full(len(xyz), np.inf)
        for step in range(1, 512):
            d = np.minimum(d, ((xyz - xyz[picked[step - 1]]) ** 2).sum(1))
            assert d[picked[step]] >= d.max() - 1e-5
    ds = build_dataset({"name": "modelnet40", "root": str(mini), "cache_dir": str(tmp_path),
                        "raw_points": 512}, "test")
    assert len(ds) == 29 and ds.points.shape == (29, 512, 3)
    np.testing.assert_allclose(ds[3][0].numpy(), unit_sphere(points[3][:, :3]), atol=2e-6)
    assert ds[3][1] == labels[3][0]


def test_cache_is_never_overwritten_without_force(tmp_path):
    root = write_modelnet40_layout(tmp_path / "mn", num_classes=3, samples_per_class=2,
                                   npoints=200)
    main = prepare_data_main()
    out = tmp_path / "out"
    args = ["modelnet40", str(root), "--out", str(out), "--splits", "test", "--points", "128",
            "--quiet"]
    assert main(args) == 0
    path = out / "modelnet40_test_128pts_fps.dat"
    before = path.read_bytes()
    path.write_bytes(before + b"user data")  # a file the user cares about
    assert main(args) == 2
    assert path.read_bytes() == before + b"user data"
    with pytest.raises(FileExistsError, match="--force"):
        mn.build_cache(root, "test", out, num_points=128, progress=False)
    assert main(args + ["--force"]) == 0
    assert path.read_bytes() == before  # deterministic rebuild
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    assert not list(root.glob("*.dat"))  # nothing written into the data folder


def test_cache_written_by_official_code_is_read(tmp_path):
    rng = np.random.default_rng(0)
    points = [rng.normal(size=(64, 6)).astype(np.float32) for _ in range(5)]
    labels = [np.array([c], dtype=np.int32) for c in (3, 0, 39, 7, 7)]
    with open(tmp_path / "modelnet40_train_64pts_fps.dat", "wb") as f:
        pickle.dump([points, labels], f)  # what the official ModelNetDataset writes
    ds = build_dataset({"name": "modelnet40", "root": str(tmp_path), "raw_points": 64}, "train")
    assert ds.class_names == list(MODELNET40_CLASSES)
    assert [ds[i][1] for i in range(5)] == [3, 0, 39, 7, 7]
    for i in range(5):
        np.testing.assert_allclose(ds[i][0].numpy(), unit_sphere(points[i][:, :3]), atol=2e-6)


# ---- ModelNet40: h5 files, and the real LiDAR h5 set --------------------------------------

def test_modelnet40_h5_is_auto_detected_in_numeric_file_order(tmp_path):
    rng = np.random.default_rng(1)
    parts = {}
    for k in (2, 10):  # "ply_data_train10" sorts before "ply_data_train2" as text
        data = rng.normal(size=(3, 2048, 3)).astype(np.float32)
        label = rng.integers(0, 40, size=(3, 1)).astype(np.uint8)
        with h5py.File(tmp_path / f"ply_data_train{k}.h5", "w") as f:
            f["data"], f["label"], f["normal"] = data, label, data
        parts[k] = (data, label)
    (tmp_path / "shape_names.txt").write_text("\n".join(MODELNET40_CLASSES) + "\n")
    ds = build_dataset({"name": "modelnet40", "root": str(tmp_path)}, "train")
    expected = np.concatenate([parts[2][0], parts[10][0]])
    assert len(ds) == 6
    for i in range(6):
        np.testing.assert_allclose(ds[i][0].numpy(), unit_sphere(expected[i]), atol=2e-6)
    assert [ds[i][1] for i in range(6)] == list(
        np.concatenate([parts[2][1], parts[10][1]])[:, 0])


def test_real_lidar_h5_loads_with_padding_repeated_and_names(shared_data):
    folder = shared_data / "lidar_h5"
    name = "data_2class_2018-12-20.h5"
    cfg = {"name": "modelnet40", "root": str(folder), "format": "h5",
           "h5_files": {"train": [name], "test": [name]},
           "shape_names": "shape_names_2class.txt"}
    ds = build_dataset(cfg, "train")
    with h5py.File(folder / name) as f:
        data, label = f["data"][:], f["label"][:]
    assert data.dtype == np.float64 and label.shape == (32, 1)  # the file's quirks
    assert ds.class_names == ["car", "wall"] and ds.num_classes == 2
    assert [ds[i][1] for i in range(32)] == label[:, 0].astype(int).tolist()
    assert ds.points.dtype == torch.float32
    padded = [i for i in range(32) if (np.abs(data[i]).sum(1) == 0).any()]
    assert padded, "the real file has zero-padded clouds"
    for i in padded[:3] + [0]:
        real = data[i][np.abs(data[i]).sum(1) > 0]
        out = ds[i][0].numpy().astype(np.float64)
        assert abs(np.linalg.norm(out, axis=1).max() - 1) < 1e-5
        uniq_out = np.unique(out, axis=0)
        uniq_real = np.unique(real, axis=0)
        assert len(uniq_out) == len(uniq_real)  # padding became repeats, not a new point
        # the same cloud up to one scale and shift
        s = np.ptp(uniq_real, 0) / np.ptp(uniq_out, 0)
        assert np.allclose(s, s[0], rtol=1e-4)
        shift = uniq_real.mean(0) - s[0] * uniq_out.mean(0)
        np.testing.assert_allclose(np.sort(uniq_out * s[0] + shift, 0), np.sort(uniq_real, 0),
                                   atol=1e-4 * s[0])
    three = dict(cfg, h5_files={"train": ["our_data_3class_2018-12-19.h5"]}, shape_names=None)
    ds3 = build_dataset(three, "train")
    assert sorted(set(ds3.labels.tolist())) == [0, 1, 2] and ds3.num_classes == 40


# ---- ScanObjectNN --------------------------------------------------------------------------

def test_scanobjectnn_variants_read_their_official_files_unnormalised(tmp_path, fixtures):
    text = (fixtures / "scanobjectnn.md").read_text()
    names = re.search(r"Classes: ([a-z, \n]+)\.", text).group(1).replace("\n", " ")
    assert list(SCANOBJECTNN_CLASSES) == [n.strip() for n in names.split(",")]
    files = {"obj_bg": "main_split/{}_objectdataset.h5",
             "obj_only": "main_split_nobg/{}_objectdataset.h5",
             "pb_t50_rs": "main_split/{}_objectdataset_augmentedrot_scale75.h5"}
    for seed, (variant, pattern) in enumerate(files.items()):
        write_scanobjectnn_layout(tmp_path / "h5_files", variant, num_classes=4,
                                  samples_per_class=2, npoints=128, seed=seed)
        for split, word in (("train", "training"), ("test", "test")):
            path = tmp_path / "h5_files" / pattern.format(word)
            with h5py.File(path) as f:
                assert sorted(f) == ["data", "label", "mask"]
                data, label = f["data"][:], f["label"][:]
            ds = build_dataset({"name": "scanobjectnn", "root": str(tmp_path),
                                "variant": variant.upper()}, split)
            assert ds.class_names == list(SCANOBJECTNN_CLASSES) and len(ds) == 8
            np.testing.assert_array_equal(ds.points.numpy(), data)  # no normalisation
            assert [ds[i][1] for i in range(8)] == label.tolist()


# ---- few-shot folds -------------------------------------------------------------------------

def check_fold(path: Path, way: int, shot: int, query: int, npoints: int):
    with open(path, "rb") as f:
        fold = pickle.load(f)
    assert sorted(fold) == ["test", "train"]
    assert len(fold["train"]) == way * shot and len(fold["test"]) == way * query
    mapping = {}
    for points, label, original in fold["train"] + fold["test"]:
        assert points.dtype == np.float32 and points.shape == (npoints, 6)
        assert 0 <= label < way
        assert mapping.setdefault(label, original) == original
    assert len(set(mapping.values())) == way
    return fold, mapping


def test_fewshot_folds_from_real_txt_files(mini, tmp_path):
    paths = make_folds(mini, tmp_path / "a", ways=[3], shots=[2], folds=2, query=1,
                       num_points=256)
    assert [p.relative_to(tmp_path / "a").as_posix() for p in paths] == [
        "3way_2shot/0.pkl", "3way_2shot/1.pkl"]
    fold, mapping = check_fold(paths[0], 3, 2, 1, 256)
    for subset in ("train", "test"):
        for points, _, original in fold[subset]:
            cls = MODELNET40_CLASSES[original]
            sources = [i for i in split_ids(mini, subset) if i.rsplit("_", 1)[0] == cls]
            # FPS starts at row 0: the first point identifies the source file
            found = [s for s in sources if np.array_equal(points[0], np.loadtxt(
                mini / cls / f"{s}.txt", delimiter=",", dtype=np.float32, max_rows=1))]
            assert len(found) == 1, f"{subset} shape of {cls} not found in its split"
    check_fold(paths[1], 3, 2, 1, 256)
    again = make_folds(mini, tmp_path / "b", ways=[3], shots=[2], folds=2, query=1,
                       num_points=256)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # seeded
    assert paths[0].read_bytes() != paths[1].read_bytes()
    with pytest.raises(FileExistsError):
        make_folds(mini, tmp_path / "a", ways=[3], shots=[2], folds=1, query=1, num_points=256)
    ds = build_dataset({"name": "modelnet40_fewshot", "root": str(tmp_path / "a"), "way": 3,
                        "shot": 2, "fold": 0}, "train")
    assert ds.num_classes == 3 and len(ds) == 6
    assert ds.class_names == [MODELNET40_CLASSES[mapping[i]] for i in range(3)]
    np.testing.assert_allclose(ds[0][0].numpy(), unit_sphere(fold["train"][0][0][:, :3]),
                               atol=2e-6)
    assert ds[0][1] == fold["train"][0][1]


def test_fewshot_folds_from_caches_via_cli(tmp_path):
    root = write_modelnet40_layout(tmp_path / "mn", num_classes=5, samples_per_class=3,
                                   npoints=300)
    main = prepare_data_main()
    assert main(["modelnet40", str(root), "--points", "128", "--quiet"]) == 0
    caches = {s: pickle.load(open(root / f"modelnet40_{s}_128pts_fps.dat", "rb"))
              for s in ("train", "test")}
    assert main(["modelnet40_fewshot", str(root), "--out", str(tmp_path / "fs"), "--way", "4",
                 "--shot", "2", "3", "--folds", "3", "--query", "3", "--points", "128"]) == 0
    for shot in (2, 3):
        for k in range(3):
            fold, _ = check_fold(tmp_path / "fs" / f"4way_{shot}shot/{k}.pkl", 4, shot, 3, 128)
            for subset in ("train", "test"):
                points, _, original = fold[subset][0]
                pool = caches[subset]
                assert any(np.array_equal(points, p) and lb[0] == original
                           for p, lb in zip(*pool, strict=True))


# ---- errors ---------------------------------------------------------------------------------

def small_layout(tmp_path) -> Path:
    return write_modelnet40_layout(tmp_path / "mn", num_classes=3, samples_per_class=2,
                                   npoints=200)


@pytest.mark.parametrize("cfg, expect", [
    ({"name": "modelnet40"}, "modelnet40_shape_names.txt"),
    ({"name": "scanobjectnn", "variant": "obj_bg"}, "main_split_nobg"),
    ({"name": "modelnet40_fewshot"}, "5way_10shot"),
])
def test_missing_root_shows_layout_and_readme(tmp_path, cfg, expect):
    with pytest.raises(DataError) as e:
        build_dataset(dict(cfg, root=str(tmp_path / "nowhere")), "train")
    assert "nowhere" in str(e.value) and expect in str(e.value)
    assert "datasets/README.md" in str(e.value)


def test_missing_files_are_named(tmp_path):
    root = small_layout(tmp_path)
    victim = root / "cube" / "cube_0002.txt"
    victim.unlink()
    with pytest.raises(DataError, match=r"cube_0002\.txt(.|\n)*README"):
        build_dataset({"name": "modelnet40", "root": str(root)}, "train")
    (tmp_path / "sonn").mkdir()
    with pytest.raises(DataError, match=r"main_split_nobg/test_objectdataset\.h5"):
        build_dataset({"name": "scanobjectnn", "root": str(tmp_path / "sonn"),
                       "variant": "obj_only"}, "test")
    with pytest.raises(DataError, match=r"3way_1shot.2\.pkl"):
        build_dataset({"name": "modelnet40_fewshot", "root": str(tmp_path), "way": 3,
                       "shot": 1, "fold": 2}, "test")


def test_truncated_or_corrupt_files_are_named(tmp_path):
    root = small_layout(tmp_path)
    ds = build_dataset({"name": "modelnet40", "root": str(root), "raw_points": 100}, "train")
    target = root / "sphere" / "sphere_0001.txt"
    text = target.read_text()
    target.write_text(text[: len(text) // 2 - 7])  # cut inside a row
    with pytest.raises(DataError, match=r"sphere_0001\.txt.*truncated or corrupt"):
        ds[0]
    target.write_text(text.replace("0.", "x.", 1))
    with pytest.raises(DataError, match=r"sphere_0001\.txt"):
        ds[0]
    target.write_text("\n".join(text.splitlines()[:50]) + "\n")
    with pytest.raises(DataError, match=r"sphere_0001\.txt.*50 rows"):
        ds[0]
    # caches
    cache = tmp_path / "modelnet40_train_8192pts_fps.dat"
    rng = np.random.default_rng(0)
    with open(cache, "wb") as f:
        pickle.dump([[rng.random((8192, 6), dtype=np.float32)] * 3,
                     [np.array([1], np.int32)] * 3], f)
    cache.write_bytes(cache.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"modelnet40_train_8192pts_fps\.dat.*truncated"):
        build_dataset({"name": "modelnet40", "root": str(tmp_path)}, "train")
    # a pickle that would run code is refused, not executed
    cache.write_bytes(pickle.dumps([[], [eval]]))  # noqa: S301 (the point of the test)
    with pytest.raises(DataError, match="refusing to load builtins.eval"):
        build_dataset({"name": "modelnet40", "root": str(tmp_path)}, "train")
    # h5
    write_scanobjectnn_layout(tmp_path / "sonn", "obj_bg", samples_per_class=1)
    h5 = tmp_path / "sonn/main_split/training_objectdataset.h5"
    h5.write_bytes(h5.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"training_objectdataset\.h5.*truncated or corrupt"):
        build_dataset({"name": "scanobjectnn", "root": str(tmp_path / "sonn"),
                       "variant": "obj_bg"}, "train")


def write_sonn(root: Path, **arrays) -> Path:
    path = root / "main_split_nobg" / "test_objectdataset.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def sonn(root: Path):
    return build_dataset({"name": "scanobjectnn", "root": str(root), "variant": "obj_only"},
                         "test")


def test_bad_content_is_reported_with_the_sample(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 64, 3)).astype(np.float32)
    label = np.array([0, 3, 14, 2, 1, 5])
    write_sonn(tmp_path, points=data, labels=label)
    with pytest.raises(DataError, match=r"keys found: \['labels', 'points'\]"):
        sonn(tmp_path)
    bad = label.copy()
    bad[4] = 15
    write_sonn(tmp_path, data=data, label=bad)
    with pytest.raises(DataError, match=r"label 15 of sample 4 is outside 0\.\.14"):
        sonn(tmp_path)
    nan = data.copy()
    nan[2, 10, 1] = np.nan
    nan[5, 0, 0] = np.inf
    write_sonn(tmp_path, data=nan, label=label)
    with pytest.raises(DataError, match=r"NaN or inf.*sample\(s\) 2, 5"):
        sonn(tmp_path)
    write_sonn(tmp_path, data=data[..., :2], label=label)
    with pytest.raises(DataError, match=r"sample 0.*wrong point dimensions"):
        sonn(tmp_path)
    # per-sample shapes in the official pickles
    points = [rng.random((32, 6), dtype=np.float32) for _ in range(4)]
    points[2] = points[2][:, :2]
    with open(tmp_path / "modelnet40_test_32pts_fps.dat", "wb") as f:
        pickle.dump([points, [np.array([0], np.int32)] * 4], f)
    with pytest.raises(DataError, match=r"sample 2 has shape \(32, 2\)"):
        build_dataset({"name": "modelnet40", "root": str(tmp_path), "raw_points": 32}, "test")
    (tmp_path / "5way_1shot").mkdir()
    entries = [(rng.random((32, 6), dtype=np.float32), lb, 0) for lb in (0, 1, 5, 2)]
    with open(tmp_path / "5way_1shot" / "0.pkl", "wb") as f:
        pickle.dump({"train": entries, "test": entries}, f)
    with pytest.raises(DataError, match=r"label 5 of sample 2 is outside 0\.\.4"):
        build_dataset({"name": "modelnet40_fewshot", "root": str(tmp_path), "way": 5,
                       "shot": 1}, "train")


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(DataError, match="data.name must be one of"):
        build_dataset({"name": "shapenet"}, "train")
    with pytest.raises(DataError, match="split"):
        build_dataset({"name": "synthetic"}, "val")
    with pytest.raises(DataError, match="variant must be one of"):
        build_dataset({"name": "scanobjectnn", "root": str(tmp_path), "variant": "hardest"},
                      "train")
    with pytest.raises(DataError, match="unknown data key.*data.variant"):
        build_dataset({"name": "synthetic", "variant": "x", "samples_per_class": 1}, "test")


# ---- batch transforms -----------------------------------------------------------------------

def rows_in(rows: torch.Tensor, table: torch.Tensor) -> bool:
    d = torch.cdist(rows, table, compute_mode="donot_use_mm_for_euclid_dist")
    return bool((d.min(1).values < 1e-6).all())


def test_test_mode_is_fps_and_leaves_full_clouds_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2048, 3, generator=g) * 2 - 1
    out = build_batch_transform({"npoints": 1024}, "test")(x)
    for b in range(3):
        np.testing.assert_array_equal(out[b].numpy(), x[b, reference_fps(x[b].numpy(), 1024)])
    for n in (2048, 8192):
        y = torch.rand(2, n, 3, generator=g)
        assert torch.equal(build_batch_transform({"npoints": n}, "test")(y), y)


def test_train_sampling_is_a_random_subset_of_the_fps_pool_per_cloud():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 4096, 3, generator=g) * 2 - 1
    tf = build_batch_transform({"npoints": 1024, "protocol": "none"}, "train")
    out = tf(x, generator=g)
    assert out.shape == (4, 1024, 3)
    for b in range(4):
        pool = x[b, reference_fps(x[b].numpy(), 1200)]
        assert rows_in(out[b], pool)
        assert len(torch.unique(out[b], dim=0)) == 1024
    first = [set(map(tuple, out[b, :50].tolist())) for b in range(2)]
    assert first[0] != first[1]
    for n in (2048, 8192):  # a permutation
        y = torch.rand(2, n, 3, generator=g)
        z = build_batch_transform({"npoints": n, "protocol": "none"}, "train")(y, generator=g)
        assert not torch.equal(z, y)
        for b in range(2):
            assert torch.equal(torch.unique(z[b], dim=0), torch.unique(y[b], dim=0))
            assert len(torch.unique(z[b], dim=0)) == n


def test_protocol_a_scales_then_translates_each_cloud_per_axis():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, 256, 3, generator=g) * 2 - 1
    out = build_batch_transform({"npoints": 256, "protocol": "A"}, "train")(x, generator=g)
    xs, os_ = x.sort(1).values, out.sort(1).values  # undo the permutation axis by axis
    scale = (os_[:, -1] - os_[:, 0]) / (xs[:, -1] - xs[:, 0])
    shift = os_[:, 0] - scale * xs[:, 0]
    assert torch.allclose(os_, xs * scale[:, None] + shift[:, None], atol=1e-5)
    assert (scale >= 2 / 3 - 1e-5).all() and (scale <= 1.5 + 1e-5).all()
    assert (shift.abs() <= 0.2 + 1e-5).all()
    assert scale.std() > 0.1 and shift.std() > 0.05  # drawn per cloud and axis
    assert scale.min() < 0.8 and scale.max() > 1.35


def test_protocol_b_rotates_about_y():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 256, 3, generator=g) * 2 - 1
    tf = build_batch_transform({"npoints": 256, "protocol": "B"}, "train")
    out = tf(x, generator=g)
    assert torch.allclose(out[..., 1].sort(1).values, x[..., 1].sort(1).values)
    radial = lambda p: (p[..., 0] ** 2 + p[..., 2] ** 2).sort(1).values  # noqa: E731
    assert torch.allclose(radial(out), radial(x), atol=1e-5)
    # recover each rotation from the point with the largest y (unique, so traceable)
    i, j = x[..., 1].argmax(1), out[..., 1].argmax(1)
    a = x[torch.arange(16), i][:, [0, 2]]
    b = out[torch.arange(16), j][:, [0, 2]]
    angle = torch.atan2(b[:, 1], b[:, 0]) - torch.atan2(a[:, 1], a[:, 0])
    assert angle.remainder(2 * np.pi).std() > 0.5
    assert "y axis up" in protocol_description({"protocol": "B"})
    assert "protocol A" in protocol_description({})


def test_vote_mode_reuses_one_fps_per_batch(monkeypatch):
    calls = []
    real = ops.furthest_point_sample
    monkeypatch.setattr(ops, "furthest_point_sample",
                        lambda p, n: calls.append(n) or real(p, n))
    x = torch.rand(2, 2000, 3)
    tf = build_batch_transform({"npoints": 1024}, "vote")
    views = [tf(x) for _ in range(3)]
    assert calls == [1200]
    assert not torch.equal(views[0], views[1])
    tf(x.clone())
    assert calls == [1200, 1200]
    x.mul_(2)  # changed in place: sampled again
    tf(x)
    assert len(calls) == 3
    copy = pickle.loads(pickle.dumps(tf))  # the memo does not travel
    copy(x)
    assert len(calls) == 4


def test_transform_is_reproducible_with_a_generator_and_checks_input():
    x = torch.rand(2, 1500, 3)
    tf = build_batch_transform({"npoints": 1024, "protocol": "A"}, "train")
    a = tf(x, generator=torch.Generator().manual_seed(5))
    b = tf(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(DataError, match="fewer than data.npoints=1024"):
        tf(torch.rand(2, 1000, 3))
    with pytest.raises(DataError, match=r"\(B, N, 3\)"):
        tf(torch.rand(1000, 3))
    with pytest.raises(DataError, match="protocol"):
        build_batch_transform({"protocol": "C"}, "train")
    with pytest.raises(DataError, match="mode"):
        build_batch_transform({}, "val")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transforms_run_on_the_batch_device():
    x = torch.rand(4, 2048, 3, device="cuda")
    for mode in ("train", "test", "vote"):
        for protocol in ("A", "B"):
            out = build_batch_transform({"npoints": 1024, "protocol": protocol}, mode)(x)
            assert out.device == x.device and out.shape == (4, 1024, 3)
    out = build_batch_transform({"npoints": 1024}, "test")(x)
    ref = reference_fps(x[0].cpu().numpy(), 1024)
    np.testing.assert_array_equal(out[0].cpu().numpy(), x[0, ref].cpu().numpy())
