"""No entry point runs code from a weights file, a checkpoint or a data cache.

Every file here carries a real payload: unpickling it in full runs `os.system("touch MARKER")`.
The tools are run as a user runs them (subprocesses of the venv's python); the marker must
never appear, and each refusal must say how to convert the file. The converter itself, run
knowingly with --trust-pickle, does run the payload: that proves the payload is real.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN, load_tool, merged

from pointclora.adapters import load_adapter
from pointclora.config import load_config
from pointclora.data.common import DataError, load_pickle
from pointclora.engine import load_checkpoint
from pointclora.models import build_model
from pointclora.models.checkpoint import UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"name": "point_mae", "num_group": 8, "group_size": 8, "trans_dim": 32, "depth": 1,
              "num_heads": 2, "encoder_dims": 32, "drop_path_rate": 0.0, "cls_dim": 4}
TINY = merged(TINY_RUN, model={"cls_dim": None})


class Payload:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def tool(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A clean tiny run, and evil files whose payload touches `marker`."""
    root = tmp_path_factory.mktemp("trust")
    marker = root / "MARKER"
    evil = Payload(f"touch {marker}")
    state = build_model(TINY_MODEL).state_dict()
    paths = {"pretrained": root / "evil_pretrain.pth", "pickle": root / "evil.dat"}
    torch.save({"base_model": state, "args": evil}, paths["pretrained"])
    with open(paths["pickle"], "wb") as f:
        pickle.dump([[evil], [0]], f)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = root / "run"
    assert load_tool("train").main(["--config", str(config), "--out", str(run)]) == 0
    # A clean checkpoint whose stored config names the evil file as its backbone.
    ckpt = torch.load(run / "checkpoints/best.pth", weights_only=True)
    ckpt["config"]["model"]["pretrained"] = str(paths["pretrained"])
    paths["ckpt"] = root / "points_at_evil.pth"
    torch.save(ckpt, paths["ckpt"])
    # An evil last.pth in a run folder of its own, to resume.
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    torch.save({"format_version": 1, "config": ckpt["config"], "epoch": 0, "x": evil},
               resumed / "checkpoints/last.pth")
    paths.update(root=root, marker=marker, config=config, run=run, resumed=resumed)
    assert not marker.exists()
    return paths


def refused(done: subprocess.CompletedProcess, setup) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert not setup["marker"].exists(), "the payload ran"
    return done.stderr


def test_train_with_evil_pretrained_file(setup):
    err = refused(tool("train", "--config", setup["config"], "--out", setup["root"] / "t1",
                       "--set", f"model.pretrained={setup['pretrained']}", cwd=setup["root"]),
                  setup)
    assert "convert_checkpoint.py" in err and "--trust-pickle" in err


def test_test_tool_with_stored_config_naming_evil_file(setup):
    err = refused(tool("test", "--ckpt", setup["ckpt"], cwd=setup["root"]), setup)
    assert "refusing to unpickle" in err


def test_visualize_with_stored_config_naming_evil_file(setup):
    refused(tool("visualize", "--ckpt", setup["ckpt"], "--out", setup["root"] / "vis",
                 "--backend", "matplotlib", "--samples", "1", cwd=setup["root"]), setup)


def test_resume_from_evil_last_checkpoint(setup):
    err = refused(tool("train", "--config", setup["config"], "--out", setup["resumed"],
                       "--resume", cwd=setup["root"]), setup)
    assert "not a readable PointCLoRA checkpoint" in err


def test_python_api_entry_points(setup):
    with pytest.raises(ValueError, match="not a readable PointCLoRA checkpoint"):
        load_checkpoint(setup["pretrained"])  # what tools/test.py --ckpt reads with
    model = build_model(TINY_MODEL)
    with pytest.raises(UnsafeCheckpointError, match="convert_checkpoint"):
        model.load_pretrained(setup["pretrained"])
    with pytest.raises(ValueError, match="not a readable adapter file"):
        load_adapter(model, setup["pretrained"])
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load"):
        load_pickle(setup["pickle"])
    cache_root = setup["root"] / "mn40"
    cache_root.mkdir(exist_ok=True)
    (cache_root / "modelnet40_train_8192pts_fps.dat").write_bytes(setup["pickle"].read_bytes())
    from pointclora.data import build_dataset
    with pytest.raises(DataError):
        build_dataset({"name": "modelnet40", "root": str(cache_root), "format": "cache"},
                      "train")
    assert not setup["marker"].exists()


def test_trust_pickle_is_a_call_argument_never_a_config_key(setup):
    with pytest.raises(ValueError, match=r"unknown model key.*model\.trust_pickle"):
        load_config(setup["config"], ["model.trust_pickle=true"])


def test_converter_needs_the_flag_and_writes_loadable_safe_files(setup, tmp_path, capsys):
    convert = load_tool("convert_checkpoint").main
    out = tmp_path / "clean.pth"
    assert convert([str(setup["pretrained"]), str(out)]) == 2
    assert not out.exists() and not setup["marker"].exists()
    marker = tmp_path / "MARKER"  # a payload of its own, so the shared marker stays clean
    src = tmp_path / "evil.pth"
    torch.save({"base_model": build_model(TINY_MODEL).state_dict(),
                "args": Payload(f"touch {marker}")}, src)
    assert convert([str(src), str(out), "--trust-pickle"]) == 0
    assert marker.exists()  # the user asked for it: the payload was real
    assert "warning: --trust-pickle" in capsys.readouterr().err
    # The result holds exactly the tensors and loads safely as model.pretrained.
    original = torch.load(src, weights_only=False)["base_model"]
    model = build_model(TINY_MODEL)
    report = model.load_pretrained(out)
    assert len(report.loaded) == len(original)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    # safetensors output: the same tensors.
    from safetensors.torch import load_file
    st = tmp_path / "clean.safetensors"
    assert convert([str(src), str(st), "--trust-pickle"]) == 0
    assert set(load_file(st)) == set(original)
    assert all(torch.equal(load_file(st)[k], original[k]) for k in original)
    # Never replaces a file.
    before = out.read_bytes()
    assert convert([str(src), str(out), "--trust-pickle"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
