"""ModelNet40 loader options: an explicit `data.h5_files` wins over a cache under the root."""
import h5py
import numpy as np
import pytest

from pointclora.data import DataError, build_dataset
from pointclora.data.common import dump_pickle
from pointclora.data.modelnet40 import cache_name


@pytest.fixture
def root_with_cache_and_h5(tmp_path):
    """A root holding an official-style cache (40-class labels) and a 2-class h5 file."""
    rng = np.random.default_rng(0)
    dump_pickle([[rng.normal(size=(64, 6)).astype(np.float32) for _ in range(3)],
                 [np.array([c], dtype=np.int32) for c in (5, 30, 39)]],
                tmp_path / cache_name("train"))
    data = rng.normal(size=(4, 32, 3)).astype(np.float32)
    with h5py.File(tmp_path / "lidar.h5", "w") as f:
        f["data"], f["label"] = data, np.array([[0], [1], [1], [0]], dtype=np.uint8)
    (tmp_path / "names.txt").write_text("car\nwall\n")
    cfg = {"name": "modelnet40", "root": str(tmp_path), "shape_names": "names.txt",
           "h5_files": {"train": ["lidar.h5"]}}
    return cfg, data


def test_explicit_h5_files_win_over_a_cache_under_the_root(root_with_cache_and_h5):
    cfg, data = root_with_cache_and_h5
    ds = build_dataset(cfg, "train")  # format: auto
    assert len(ds) == 4 and ds.class_names == ["car", "wall"]
    assert [ds[i][1] for i in range(4)] == [0, 1, 1, 0]
    centred = data - data.mean(1, keepdims=True)
    expected = centred / np.linalg.norm(centred, axis=-1).max(1)[:, None, None]
    np.testing.assert_allclose(ds.points.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("fmt", ["cache", "txt"])
def test_h5_files_with_another_format_is_named(root_with_cache_and_h5, fmt):
    cfg, _ = root_with_cache_and_h5
    with pytest.raises(DataError, match=f"data.h5_files .* data.format is '{fmt}'"):
        build_dataset(dict(cfg, format=fmt), "train")


def test_cache_whose_labels_do_not_fit_the_names_is_named(root_with_cache_and_h5):
    cfg, _ = root_with_cache_and_h5
    del cfg["h5_files"]
    with pytest.raises(DataError, match=r"labels go up to 39, but there are 2 class names; "
                       r"data.format: auto \(a cache is found first\)"):
        build_dataset(cfg, "train")
