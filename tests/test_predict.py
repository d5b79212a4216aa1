"""tools/predict.py: point files of every supported format, the training normalisation and
sampling, top-k class names stored in (or, for older checkpoints, derived for) a checkpoint."""
import json
import runpy
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RUN, merged

from pointclora.data import SYNTHETIC_CLASSES, DataError, build_batch_transform, build_dataset
from pointclora.data.files import read_points
from pointclora.engine import load_checkpoint, restore_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = merged(TINY_RUN, data={"samples_per_class": 4})


def _write_ply(path, xyz, fmt):
    head = (f"ply\nformat {fmt} 1.0\ncomment written by hand\nelement vertex {len(xyz)}\n"
            "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
            "element face 0\nproperty list uchar int vertex_indices\nend_header\n")
    if fmt == "ascii":
        body = "".join(f"{x!r} {y!r} {z!r} 7\n" for x, y, z in xyz.tolist()).encode()
    else:
        body = b"".join(struct.pack("<fffB", *p, 7) for p in xyz.tolist())
    path.write_bytes(head.encode() + body)


def _write_pcd(path, xyz, fmt):
    head = ("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z intensity\nSIZE 4 4 4 4\nTYPE F F F F\n"
            f"COUNT 1 1 1 1\nWIDTH {len(xyz)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
            f"POINTS {len(xyz)}\nDATA {fmt}\n")
    if fmt == "ascii":
        body = "".join(f"{x!r} {y!r} {z!r} 0.5\n" for x, y, z in xyz.tolist()).encode()
    else:
        body = b"".join(struct.pack("<ffff", *p, 0.5) for p in xyz.tolist())
    path.write_bytes(head.encode() + body)


@pytest.fixture
def files(tmp_path):
    xyz = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.savetxt(tmp_path / "a.txt", np.c_[xyz, xyz], delimiter=",")  # x,y,z,nx,ny,nz
    np.savetxt(tmp_path / "b.xyz", xyz)
    np.save(tmp_path / "c.npy", xyz)
    for fmt in ("ascii", "binary_little_endian"):
        _write_ply(tmp_path / f"{fmt}.ply", xyz, fmt)
    for fmt in ("ascii", "binary"):
        _write_pcd(tmp_path / f"{fmt}.pcd", xyz, fmt)
    return xyz, sorted(tmp_path.iterdir())


def test_built_in_reader_reads_every_format(files):
    xyz, paths = files
    assert len(paths) == 7
    for path in paths:
        np.testing.assert_allclose(read_points(path, use_open3d=False), xyz, rtol=1e-6,
                                   err_msg=path.name)


def test_open3d_reads_the_same_points(files):
    pytest.importorskip("open3d")
    xyz, paths = files
    for path in paths:
        if path.suffix in (".ply", ".pcd"):
            np.testing.assert_allclose(read_points(path), xyz, rtol=1e-6, err_msg=path.name)


def test_reader_names_bad_files(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.obj'"):
        read_points(tmp_path / "mesh.obj")
    (tmp_path / "flat.txt").write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match=r"flat.txt: expected rows of x, y, z"):
        read_points(tmp_path / "flat.txt")
    (tmp_path / "c.pcd").write_bytes(b"FIELDS x y z\nPOINTS 1\nDATA binary_compressed\n\0\0")
    with pytest.raises(DataError, match="binary_compressed needs Open3D"):
        read_points(tmp_path / "c.pcd", use_open3d=False)
    (tmp_path / "nan.txt").write_text("0 0 0\n1 nan 2\n")
    with pytest.raises(DataError, match=r"nan.txt: NaN or inf coordinates"):
        read_points(tmp_path / "nan.txt")
    (tmp_path / "point.txt").write_text("1 2 3\n1 2 3\n")
    with pytest.raises(DataError, match=r"point.txt: .*only zeros or one repeated point"):
        read_points(tmp_path / "point.txt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run of a tiny CLoRA model on 4 synthetic classes."""
    root = tmp_path_factory.mktemp("predict")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    train = runpy.run_path(str(ROOT / "tools/train.py"))["main"]
    assert train(["--config", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    return root


def _predict(argv, capsys):
    code = runpy.run_path(str(ROOT / "tools/predict.py"))["main"](argv)
    return code, capsys.readouterr()


def test_predict_matches_an_independent_forward_pass(run, capsys):
    ckpt_path = run / "run/checkpoints/last.pth"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["class_names"] == list(SYNTHETIC_CLASSES[:4])  # carried by the checkpoint
    test_set = build_dataset(TINY["data"], "test")
    clouds = [test_set[i][0].numpy() for i in (0, 5, 9)]
    paths = [run / "s0.npy", run / "s5.xyz", run / "s9.ply"]
    np.save(paths[0], clouds[0])
    np.savetxt(paths[1], clouds[1])
    _write_ply(paths[2], clouds[2], "binary_little_endian")
    code, out = _predict(["--ckpt", str(ckpt_path), *map(str, paths), "--topk", "3", "--json"],
                         capsys)
    assert code == 0, out.err
    results = json.loads(out.out)["results"]

    model, _ = restore_model(ckpt["config"], ckpt)
    batch = torch.stack([torch.from_numpy(c) for c in clouds])
    centred = batch - batch.mean(1, keepdim=True)  # unit sphere, as the ModelNet40 loader
    batch = centred / centred.norm(dim=-1).amax(1)[:, None, None]
    batch = build_batch_transform(TINY["data"], "test")(batch)
    with torch.no_grad():
        probs = model.eval()(batch).softmax(-1)
    for res, p, path in zip(results, probs, paths, strict=True):
        assert res["file"] == str(path)
        order = p.argsort(descending=True)[:3].tolist()
        assert [t["class"] for t in res["top"]] == [SYNTHETIC_CLASSES[i] for i in order]
        np.testing.assert_allclose([t["prob"] for t in res["top"]], p[order].numpy(),
                                   rtol=1e-4, atol=1e-6)

    code, out = _predict(["--ckpt", str(ckpt_path), str(paths[0])], capsys)
    assert code == 0 and out.out.splitlines()[0] == str(paths[0])
    assert out.out.splitlines()[1].split()[:2] == ["1.", results[0]["top"][0]["class"]]


def test_older_checkpoint_without_names_uses_its_data_config(run, capsys):
    ckpt = load_checkpoint(run / "run/checkpoints/last.pth")
    del ckpt["class_names"]
    save_checkpoint(ckpt, run / "old.pth")
    np.save(run / "one.npy", build_dataset(TINY["data"], "test")[3][0].numpy())
    code, out = _predict(["--ckpt", str(run / "old.pth"), str(run / "one.npy"), "--json",
                          "--topk", "4"], capsys)
    assert code == 0, out.err
    top = json.loads(out.out)["results"][0]["top"]
    assert sorted(t["class"] for t in top) == sorted(SYNTHETIC_CLASSES[:4])


def test_predict_refuses_too_few_points(run, capsys):
    np.save(run / "small.npy", np.random.default_rng(0).random((10, 3), dtype=np.float32))
    code, out = _predict(["--ckpt", str(run / "run/checkpoints/last.pth"),
                          str(run / "small.npy")], capsys)
    assert code == 2 and "10 points, fewer than the 64" in out.err
