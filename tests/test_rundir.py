"""Records that are true, the right weights or a clear no: run folders, resume, outputs, bad
inputs to the tools. Tiny synthetic runs (1-3 epochs of a depth-1 model)."""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RUN, load_tool, merged

from pointclora.data.common import DataError, check_points
from pointclora.data.modelnet40 import ModelNet40Files
from pointclora.engine import load_checkpoint
from pointclora.engine import trainer as trainer_module
from pointclora.engine.rundir import LOCK_NAME, RunLockedError, prepare_run_dir

REPO = Path(__file__).resolve().parents[1]
TINY = merged(TINY_RUN, train={"epochs": 2, "lr": 5.0e-3})


train_tool, test_tool, flops_tool = (load_tool(n) for n in ("train", "test", "flops"))


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(merged(TINY, **sections)))
    return path


def train(config: Path, run: Path, *extra: str) -> int:
    return train_tool.main(["--config", str(config), "--out", str(run), *extra])


def log_epochs(run: Path) -> list[int]:
    with open(run / "log.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run (read only)."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "tiny.yaml")
    assert train(config, root / "run") == 0
    return config, root / "run"


# --- bad inputs: a clean one-line error, exit code 2, no traceback ---------------------------

@pytest.mark.parametrize("override, words", [
    ("train.lr=abc", ["train.lr", "a number", "'abc' (str)"]),
    ("data.npoints=abc", ["data.npoints", "an integer", "'abc'"]),
    ("data.num_classes=abc", ["data.num_classes", "an integer"]),
    ("train.seed=abc", ["train.seed", "an integer"]),
    ("train.epochs=true", ["train.epochs", "an integer", "True (bool)"]),
    ("data.npoint=5", ["unknown data key", "data.npoint", "npoints"]),
    ("model.depht=2", ["unknown model key", "model.depht", "depth"]),
    ("adapter.rank=4", ["unknown adapter key", "adapter.rank", "'r'"]),
])
def test_train_refuses_bad_values_cleanly(tmp_path, capsys, override, words):
    config = write_config(tmp_path / "c.yaml")
    assert train(config, tmp_path / "run", "--set", override) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_test_tool_refuses_bad_checkpoints_and_options(finished, tmp_path, capsys):
    config, run = finished
    best = run / "checkpoints" / "best.pth"
    (tmp_path / "text.pth").write_text("hello\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    ckpt = torch.load(best, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "config"}, tmp_path / "noconfig.pth")
    cases = [
        (["--ckpt", str(tmp_path / "text.pth")], "not a PyTorch checkpoint file (it starts"),
        (["--ckpt", str(tmp_path / "empty.pth")], "is empty"),
        (["--ckpt", str(tmp_path / "noconfig.pth")], "no ['config'] entry"),
        # the r=8 adapter is not silently evaluated as asked for r=4, nor the reverse
        (["--ckpt", str(best), "--set", "adapter.r=4"], "adapter.r: checkpoint 8, config 4"),
        # a config whose data set has another number of classes
        (["--ckpt", str(best), "--config",
          str(write_config(tmp_path / "ten.yaml", data={"num_classes": 6}))],
         "model.cls_dim: checkpoint 4, config 6"),
    ]
    for argv, words in cases:
        assert test_tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (argv, err)
    for argv in (["--batch-size", "0"], ["--vote", "0"]):
        with pytest.raises(SystemExit) as exit_:
            test_tool.parse_args(["--ckpt", str(best), *argv])
        assert exit_.value.code == 2
        assert "must be a positive integer" in capsys.readouterr().err


def test_resume_refuses_changed_adapter_options(finished, tmp_path, capsys):
    config, run = finished
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoints").mkdir()
    (copy / "checkpoints" / "last.pth").write_bytes((run / "checkpoints/last.pth").read_bytes())
    assert train(config, copy, "--resume", "--set", "adapter.r=4", "train.epochs=3") == 2
    assert "adapter.r: checkpoint 8, config 4" in capsys.readouterr().err


# --- outputs never replace files the tool did not write ---------------------------------------

def test_test_json_checks_its_path_before_evaluating(finished, tmp_path, monkeypatch, capsys):
    _, run = finished
    best = run / "checkpoints" / "best.pth"
    victim = tmp_path / "precious.pth"
    victim.write_bytes(best.read_bytes())

    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated before the output path was checked")

    with monkeypatch.context() as patch:
        patch.setattr(test_tool, "evaluate_checkpoint", evaluate)
        for target, words in ((victim, "already exists"), (tmp_path / "nope" / "r.json",
                                                          "does not exist")):
            assert test_tool.main(["--ckpt", str(best), "--json", str(target)]) == 2
            assert words in capsys.readouterr().err
    assert victim.read_bytes() == best.read_bytes()
    # Its own result file may be replaced.
    out = tmp_path / "result.json"
    assert test_tool.main(["--ckpt", str(best), "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["written_by"] == "tools/test.py"
    assert test_tool.main(["--ckpt", str(best), "--json", str(out)]) == 0


def test_flops_table_out_never_overwrites_silently(tmp_path, monkeypatch, capsys):
    table = tmp_path / "table.md"
    table.write_text("my notes\n")
    config = write_config(tmp_path / "c.yaml")
    monkeypatch.setattr(flops_tool, "methods_table",
                        lambda cfg, device: pytest.fail("worked before checking --table-out"))
    assert flops_tool.main(["--config", str(config), "--all-methods",
                            "--table-out", str(table)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert table.read_text() == "my notes\n"
    monkeypatch.setattr(flops_tool, "methods_table", lambda cfg, device: ("| new |\n", []))
    assert flops_tool.main(["--config", str(config), "--all-methods", "--table-out", str(table),
                            "--overwrite"]) == 0
    assert table.read_text() == "| new |\n"


# --- run folders ---------------------------------------------------------------------------

def test_a_kill_right_after_last_pth_keeps_the_log_row(tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.yaml", train={"epochs": 3})
    run = tmp_path / "run"
    real = trainer_module.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(payload, path):
        real(payload, path)
        if Path(path).name == "last.pth" and payload["epoch"] == 1:
            raise Killed  # the process dies right after last.pth was replaced

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(config, run)
    monkeypatch.setattr(trainer_module, "save_checkpoint", real)
    assert load_checkpoint(run / "checkpoints/last.pth")["epoch"] == 1
    assert log_epochs(run) == [0, 1]  # the row of the saved epoch is there
    assert train(config, run, "--resume") == 0
    assert log_epochs(run) == [0, 1, 2]


def test_exist_ok_moves_the_old_run_aside_and_starts_empty(finished, tmp_path):
    config, original = finished
    run = tmp_path / "run"
    run.mkdir()
    for path in original.rglob("*"):
        if path.is_file() and path.name != LOCK_NAME:
            (run / path.relative_to(original)).parent.mkdir(parents=True, exist_ok=True)
            (run / path.relative_to(original)).write_bytes(path.read_bytes())
    (run / "notes.txt").write_text("mine")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert train(config, run, "--set", "train.epochs=1") == 2  # refused without --exist-ok
    assert train(config, run, "--exist-ok", "--set", "train.epochs=1") == 0
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1
    after = {p.relative_to(old[0]): p.read_bytes() for p in old[0].rglob("*")
             if p.is_file() and p.name != LOCK_NAME}
    assert after == before  # nothing of the old run lost or changed
    assert not (run / "notes.txt").exists()
    assert log_epochs(run) == [0]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert len(list((run / "tensorboard").iterdir())) == 1  # no old events mixed in


def test_resume_records_changes_or_refuses_them(finished, tmp_path, capsys):
    config, original = finished
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("checkpoints/last.pth", "checkpoints/best.pth", "log.csv", "config.yaml"):
        (run / name).write_bytes((original / name).read_bytes())
    (run / "checkpoints" / "last.pth.tmp").write_bytes(b"half a checkpoint")
    # lr is restored with the optimiser state: a new value would never run
    assert train(config, run, "--resume", "--set", "train.lr=1e-2", "train.epochs=3") == 2
    assert "train.lr: 0.005 -> 0.01" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == (original / "config.yaml").read_bytes()
    assert train(config, run, "--resume", "--set", "train.epochs=3") == 0
    assert not (run / "checkpoints" / "last.pth.tmp").exists()
    changes = [{"epoch": 2, "key": "output_dir", "old": str(original), "new": str(run)},
               {"epoch": 2, "key": "train.epochs", "old": 2, "new": 3}]  # the folder moved
    assert json.loads((run / "metrics.json").read_text())["config_changes"] == changes
    assert load_checkpoint(run / "checkpoints/last.pth")["changes"] == changes
    text = (run / "config.yaml").read_text()
    assert "# from epoch 2: train.epochs = 3 (before: 2)" in text
    assert yaml.safe_load(text)["train"]["epochs"] == 3
    assert log_epochs(run) == [0, 1, 2]


def test_a_failed_start_does_not_block_the_retry(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    run = tmp_path / "run"
    missing = str(tmp_path / "no_weights.pth")
    assert train(config, run, "--set", f"model.pretrained={missing}") == 2
    assert "no_weights.pth" in capsys.readouterr().err
    assert (run / "train.log").is_file()  # the failed attempt is on record
    assert train(config, run, "--resume") == 2
    assert "never reached its first checkpoint" in capsys.readouterr().err
    assert train(config, run) == 0
    assert log_epochs(run) == [0, 1]
    assert not locked_elsewhere(run)  # a finished fit lets go of its folder


def locked_elsewhere(run: Path) -> bool:
    """Whether another process fails to take the run folder's lock."""
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    return subprocess.run([sys.executable, "-c", probe, str(run / LOCK_NAME)],
                          capture_output=True).returncode != 0


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
         "from pointclora.engine.rundir import prepare_run_dir; prepare_run_dir(sys.argv[1], "
         "resume=False); print('held', flush=True); time.sleep(120)", str(run), str(REPO)],
        stdout=subprocess.PIPE, text=True)
    try:
        from pointclora.engine.rundir import release_run_dir
        release_run_dir(run)  # this process lets go: the helper takes it
        assert holder.stdout.readline().strip() == "held"
        assert locked_elsewhere(run)
        with pytest.raises(RunLockedError, match="in use by another process"):
            prepare_run_dir(run, exist_ok=True)
        assert run.is_dir() and not list(tmp_path.glob("run.old-*"))
    finally:
        holder.kill()
        holder.wait()
    assert prepare_run_dir(run) == run  # the kernel released the dead process's lock


# --- data ----------------------------------------------------------------------------------

def test_folds_are_checked_against_the_files(tmp_path, capsys):
    folder = tmp_path / "folds" / "3way_8shot"
    folder.mkdir(parents=True)
    for k in (0, 1):
        with open(folder / f"{k}.pkl", "wb") as f:
            pickle.dump({"train": [], "test": []}, f)
    config = write_config(tmp_path / "fs.yaml", data={"name": "modelnet40_fewshot", "root": str(
        tmp_path / "folds"), "way": 3, "shot": 8, "fold": 0, "npoints": 64})
    config.write_text(config.read_text().replace("  num_classes: 4\n", "")
                      .replace("  samples_per_class: 12\n", ""))
    assert train(config, tmp_path / "fs", "--folds", "0-3") == 2
    err = capsys.readouterr().err
    assert "fold(s) [2, 3] do not exist" in err and "[0, 1]" in err
    assert not (tmp_path / "fs").exists()
    plain = write_config(tmp_path / "plain.yaml")
    assert train(plain, tmp_path / "p", "--folds", "0") == 2
    assert "modelnet40_fewshot" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [np.zeros((16, 6)), np.tile([[0.3, -1.0, 2.0, 0, 0, 1]],
                                                               (16, 1))])
def test_txt_loader_refuses_clouds_without_extent(tmp_path, rows):
    path = tmp_path / "flat.txt"
    np.savetxt(path, rows, fmt="%.6f", delimiter=",")
    with pytest.raises(DataError, match="only zeros or one repeated point"):
        ModelNet40Files([path], np.array([0]), ["a"], num_points=16)[0]
    good = tmp_path / "good.txt"
    np.savetxt(good, np.random.default_rng(0).normal(size=(16, 6)), fmt="%.6f", delimiter=",")
    points, _ = ModelNet40Files([good], np.array([0]), ["a"], num_points=16)[0]
    assert points.norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DataError, match=r"sample\(s\) 1 hold only"):
        check_points(torch.stack([points, torch.ones(16, 3)]), "h5")
