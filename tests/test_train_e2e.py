"""End to end: tools/train.py and tools/test.py on a tiny Point-MAE with the real modules."""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RUN, load_tool, merged

from pointclora.adapters import parameter_report
from pointclora.config import load_config
from pointclora.data import protocol_description
from pointclora.data.synthetic import generate
from pointclora.engine import load_checkpoint, restore_model, save_checkpoint
from pointclora.engine import trainer as trainer_module
from pointclora.engine.tasks import TASKS, ClassificationTask, build_task, register_task

REPO = Path(__file__).resolve().parents[1]
TINY = merged(TINY_RUN, model={"drop_path_rate": 0.1}, data={"protocol": "A"},
              train={"epochs": 3, "lr": 5.0e-3, "warmup_epochs": 1})


train_tool, test_tool = load_tool("train"), load_tool("test")


def write_config(path: Path, data: dict | None = None, **sections) -> Path:
    """TINY with `sections` merged in and, when given, `data` in place of its data section."""
    cfg = merged(TINY, **sections)
    if data is not None:
        cfg["data"] = data
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 3-epoch run, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("run")
    config = write_config(root / "tiny.yaml")
    run = root / "out"
    assert train_tool.main(["--config", str(config), "--out", str(run)]) == 0
    return config, run


def test_run_writes_every_output_and_the_loss_falls(trained):
    config, run = trained
    for name in ("config.yaml", "log.csv", "train.log", "metrics.json", "curves.png",
                 "confusion.png", "checkpoints/best.pth", "checkpoints/last.pth"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_log(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    # The saved config is the user's, resolved: it reloads to itself; what the data settled
    # (cls_dim) is recorded under `derived`, not written into the user's model section.
    saved = load_config(run / "config.yaml")
    expected = load_config(config)
    expected["output_dir"] = str(run)
    expected["derived"] = {"model": {"cls_dim": 4}}
    assert saved == expected and "cls_dim" not in saved["model"]
    log = (run / "train.log").read_text()
    assert "epoch 2/3" in log and "protocol A" in log and "trainable" in log


def test_metrics_json_matches_the_log_and_the_model(trained):
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    accs = [float(r["test_acc"]) for r in read_log(run)]
    assert metrics["best_acc"] == pytest.approx(max(accs))
    assert metrics["best_epoch"] == accs.index(max(accs))
    assert metrics["final_acc"] == pytest.approx(accs[-1]) and metrics["final_epoch"] == 2
    cfg = load_config(run / "config.yaml")
    assert metrics["protocol"] == protocol_description(cfg["data"])
    assert metrics["method"] == "clora" and metrics["backbone"] == "point_mae"
    model, _ = restore_model(cfg, load_checkpoint(run / "checkpoints" / "last.pth"))
    assert metrics["parameters"] == parameter_report(model)
    assert metrics["wall_time_s"] > 0 and metrics["world_size"] == 1
    assert metrics["task"] == "classification" and metrics["derived"] == {"model": {"cls_dim": 4}}
    # Mean class and per-class accuracy of the best epoch, from its confusion matrix.
    counts = np.array(metrics["confusion"]["counts"])
    per_class = metrics["per_class_acc"]
    assert list(per_class) == metrics["confusion"]["classes"] == ["sphere", "cube", "cylinder",
                                                                  "cone"]
    for i, (name, row) in enumerate(per_class.items()):
        assert row["samples"] == counts[i].sum() == 12, name
        assert row["acc"] == pytest.approx(100 * counts[i, i] / 12)
    assert metrics["best_acc"] == pytest.approx(100 * np.trace(counts) / counts.sum())
    assert metrics["best_macc"] == pytest.approx(np.mean([r["acc"] for r in per_class.values()]))
    macc = [float(r["test_macc"]) for r in read_log(run)]
    assert metrics["best_macc"] == pytest.approx(macc[metrics["best_epoch"]])


def test_peft_on_a_random_backbone_is_flagged_loudly(trained, tmp_path):
    _, run = trained
    warnings = json.loads((run / "metrics.json").read_text())["warnings"]
    assert len(warnings) == 1 and "RANDOMLY INITIALISED" in warnings[0]
    assert "WARNING: model.pretrained is null" in (run / "train.log").read_text()
    # Full fine-tuning of a random model is ordinary training: no warning.
    config = write_config(tmp_path / "full.yaml", adapter={"method": "full"},
                          train={"epochs": 1})
    assert train_tool.main(["--config", str(config), "--out", str(tmp_path / "full")]) == 0
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["warnings"] == []


def test_checkpoints_are_adapter_only_plus_the_unrecoverable_random_backbone(trained):
    _, run = trained
    ckpt = load_checkpoint(run / "checkpoints" / "last.pth")
    cfg = ckpt["config"]
    model, _ = restore_model(cfg, ckpt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt["adapter"]["state_dict"]) >= trainable
    assert ckpt["adapter"]["method"] == "clora"
    # No pretrained file: the frozen random backbone must travel with the checkpoint,
    # under the official key names.
    assert "blocks.blocks.0.attn.qkv.weight" in ckpt["base_model"]
    best = load_checkpoint(run / "checkpoints" / "best.pth")
    assert "optimizer" not in best and "optimizer" in ckpt


def test_test_tool_reproduces_the_accuracy_saved_at_training_time(trained, tmp_path):
    config, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "best.json"
    assert test_tool.main(["--ckpt", str(run / "checkpoints/best.pth"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["acc"] == metrics["best_acc"]
    # With the config file given explicitly, from the last checkpoint.
    assert test_tool.main(["--config", str(config), "--ckpt", str(run / "checkpoints/last.pth"),
                           "--json", str(out)]) == 0
    assert json.loads(out.read_text())["acc"] == metrics["final_acc"]
    assert test_tool.main(["--ckpt", str(run / "checkpoints/last.pth"), "--vote", "3",
                           "--json", str(out)]) == 0
    voted = json.loads(out.read_text())
    assert voted["views"] == 3 and 0 <= voted["acc"] <= 100
    assert voted["voting"] == "3-view voting"


def test_test_tool_reports_mean_class_accuracy_per_class_table_and_confusion(trained, tmp_path,
                                                                             capsys):
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    out, png = tmp_path / "r.json", tmp_path / "cm.png"
    capsys.readouterr()
    assert test_tool.main(["--ckpt", str(run / "checkpoints/best.pth"), "--json", str(out),
                           "--confusion", str(png)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["voting"] == "none (single pass)"
    assert result["macc"] == metrics["best_macc"]
    assert result["per_class_acc"] == metrics["per_class_acc"]
    assert result["confusion"] == metrics["confusion"]
    assert f"mean class {metrics['best_macc']:.2f}%" in printed
    assert (f"; at save time accuracy {metrics['best_acc']:.2f}% (mean class "
            f"{metrics['best_macc']:.2f}%) without voting") in printed.splitlines()[0]
    for name, row in metrics["per_class_acc"].items():
        assert any(line.split() == [name, f"{row['acc']:.2f}", "12"]
                   for line in printed.splitlines()), name
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_best_of_repeated_voting_is_the_max_over_seeded_repeats_and_says_so(trained, tmp_path,
                                                                            capsys):
    _, run = trained
    ckpt, out = str(run / "checkpoints/best.pth"), tmp_path / "r.json"
    singles = []
    for seed in range(3):  # repeat r is the voted evaluation under train.seed + r
        assert test_tool.main(["--ckpt", ckpt, "--vote", "2", "--set", f"train.seed={seed}",
                               "--json", str(out)]) == 0
        singles.append(json.loads(out.read_text())["acc"])
    capsys.readouterr()
    assert test_tool.main(["--ckpt", ckpt, "--vote", "2", "--vote-repeats", "3",
                           "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["acc"] == max(singles)
    assert result["repeat_stats"]["mean"] == pytest.approx(np.mean(singles))
    assert result["voting"].startswith("best of 3 repeats of 2-view voting")
    assert "best of 3 repeats" in capsys.readouterr().out


def test_an_existing_run_dir_is_refused_untouched(trained, capsys):
    config, run = trained
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert train_tool.main(["--config", str(config), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--exist-ok" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_sigterm_saves_the_finished_epoch_and_resume_continues_exactly(tmp_path, monkeypatch,
                                                                       capsys):
    """SIGTERM arriving while epoch 1 is being saved: the save completes, the tool exits 143
    with the resume command (no traceback), and the resumed run ends bit for bit like an
    uninterrupted one."""
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 4, "val_every": 2})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_tool.main(["--config", str(config), "--out", str(straight)]) == 0

    log_epoch = trainer_module.Recorder.log_epoch

    def terminated_during_epoch_1(self, row):
        log_epoch(self, row)
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module.Recorder, "log_epoch", terminated_during_epoch_1)
    capsys.readouterr()
    assert train_tool.main(["--config", str(config), "--out", str(resumed)]) == 128 + 15
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "Traceback" not in err
    command = err.strip().splitlines()[-1].split()
    assert command[-1] == "--resume" and command[command.index("--out") + 1] == str(resumed)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert load_checkpoint(resumed / "checkpoints/last.pth")["epoch"] == 1
    assert train_tool.main(command[2:]) == 0  # the printed command, minus "python tool"

    a = load_checkpoint(straight / "checkpoints/last.pth")
    b = load_checkpoint(resumed / "checkpoints/last.pth")
    assert a["epoch"] == b["epoch"] == 3
    sa, sb = a["adapter"]["state_dict"], b["adapter"]["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    drop = ("epoch_time",)
    rows_a = [{k: v for k, v in r.items() if k not in drop} for r in read_log(straight)]
    rows_b = [{k: v for k, v in r.items() if k not in drop} for r in read_log(resumed)]
    assert rows_a == rows_b and len(rows_a) == 4
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert (ma["best_acc"], ma["final_acc"]) == (mb["best_acc"], mb["final_acc"])


def test_ctrl_c_mid_epoch_exits_130_with_the_resume_command_and_no_traceback(tmp_path,
                                                                            monkeypatch, capsys):
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 4})
    run = tmp_path / "run"
    calls = []
    regularization_loss = trainer_module.regularization_loss

    def ctrl_c_in_epoch_2(model):  # called once per training step; 6 steps per epoch
        calls.append(1)
        if len(calls) == 2 * 6 + 3:
            os.kill(os.getpid(), signal.SIGINT)
        return regularization_loss(model)

    monkeypatch.setattr(trainer_module, "regularization_loss", ctrl_c_in_epoch_2)
    assert train_tool.main(["--config", str(config), "--out", str(run),
                            "--set", "train.lr=1e-3"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGINT" in err and "epochs up to 1" in err
    assert err.strip().splitlines()[-1].split()[2:] == [
        "--config", str(config), "--out", str(run), "--set", "train.lr=1e-3", "--resume"]
    assert load_checkpoint(run / "checkpoints/last.pth")["epoch"] == 1
    assert [int(r["epoch"]) for r in read_log(run)] == [0, 1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen) -> None:
    """Until the training process has written its first last.pth (a guard against hangs)."""
    hang_guard = time.monotonic() + 600
    while not (run / "checkpoints/last.pth").is_file() and proc.poll() is None:
        if time.monotonic() > hang_guard:
            pytest.fail("the run wrote no checkpoint")
        time.sleep(0.2)


def test_ctrl_c_on_a_real_training_process(tmp_path):
    """What a user sees: SIGINT to `python tools/train.py` mid-run ends it with status 130,
    no traceback, and the resume command on stderr."""
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 500})
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools/train.py"), "--config", str(config), "--out",
         str(run), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for_checkpoint(run, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "SIGINT" in err
    assert err.strip().splitlines()[-1].split()[-1] == "--resume"
    load_checkpoint(run / "checkpoints/last.pth")  # a complete checkpoint to resume from


def test_ctrl_c_under_torchrun_stops_every_rank_together(tmp_path):
    """Ctrl-C reaches the launcher and both ranks (one process group, as in a terminal): the
    ranks stop at the same batch, none hangs, rank 0 alone prints the resume command."""
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 500})
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tools/train.py"), "--config", str(config), "--out", str(run),
         "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for_checkpoint(run, proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)  # a rank left in a collective would hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err.count("continue with:") == 1, out[-2000:] + err[-3000:]
    command = err.split("continue with:")[1].split("\n")[1].split()
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"] and command[-1] == "--resume"
    load_checkpoint(run / "checkpoints/last.pth")  # complete


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path,
                                                                           monkeypatch, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    monkeypatch.setattr(trainer_module, "regularization_loss",
                        lambda model: os.kill(os.getpid(), signal.SIGINT))
    assert train_tool.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing to resume" in err
    command = err.strip().splitlines()[-1].split()
    assert "--resume" not in command
    monkeypatch.undo()
    assert train_tool.main(command[2:]) == 0  # the printed command starts the run again


def test_a_run_saved_before_tasks_and_derived_settings_resumes(trained, tmp_path):
    """Checkpoints of earlier versions: cls_dim written into the model section, no
    `derived`, best metrics without mean class accuracy."""
    import shutil

    config, run = trained
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / ".lock").unlink(missing_ok=True)
    ckpt = load_checkpoint(old / "checkpoints/last.pth")
    cfg = {k: v for k, v in ckpt["config"].items() if k != "derived"}
    cfg["model"] = {**cfg["model"], "cls_dim": 4}
    best = {k: ckpt["best_metrics"][k] for k in ("acc", "epoch", "confusion")}
    best["acc"] = 100.0  # stays the best: the details come from this old-format record
    old_ckpt = {k: v for k, v in ckpt.items() if k not in ("task", "format_version")}
    save_checkpoint({**old_ckpt, "config": cfg, "best_metrics": best,
                     "metrics": {"acc": ckpt["metrics"]["acc"], "epoch": 2}},
                    old / "checkpoints/last.pth")
    assert train_tool.main(["--config", str(config), "--out", str(old), "--resume",
                            "--set", "train.epochs=4"]) == 0
    metrics = json.loads((old / "metrics.json").read_text())
    assert metrics["final_epoch"] == 3 and metrics["derived"] == {"model": {"cls_dim": 4}}
    assert metrics["best_epoch"] == best["epoch"] and metrics["best_macc"] is None
    assert sum(r["samples"] for r in metrics["per_class_acc"].values()) == 48


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    assert train_tool.main(["--config", str(config), "--out", str(tmp_path / "none"),
                            "--resume"]) == 2
    assert "last.pth" in capsys.readouterr().err


# tools/train.py with a spy on evaluation: each rank appends the sums of the buffers of the
# model it evaluates with (BatchNorm running statistics) to buffers_<rank>.txt.
SPY = """
import os, runpy, sys
from pointclora.engine import trainer
real, out = trainer.collect, sys.argv[1]
def spy(model, *args, **kwargs):
    with open(os.path.join(out, f"buffers_{os.environ['RANK']}.txt"), "a") as f:
        f.write(repr([b.double().sum().item() for b in model.buffers()]) + "\\n")
    return real(model, *args, **kwargs)
trainer.collect = spy
sys.argv = [sys.argv[2]] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_torchrun_two_processes_write_one_set_of_outputs(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 2})
    run = tmp_path / "ddp"
    (tmp_path / "spy.py").write_text(SPY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # `python -m torch.distributed.run` is the `torchrun` command
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "spy.py"), str(tmp_path), str(REPO / "tools/train.py"),
         "--config", str(config), "--out", str(run), "--device", "cpu"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert [int(r["epoch"]) for r in read_log(run)] == [0, 1]  # one writer, no duplicates
    assert proc.stdout.count("best test accuracy") == 1  # rank 0 alone reports
    ckpt = load_checkpoint(run / "checkpoints/last.pth")
    assert len(ckpt["rng"]) == 2  # both ranks' random streams, for an exact resume
    # Both ranks evaluated their test shards with the same buffers (rank 0's, the saved
    # ones), so the saved model re-evaluates in one process to what the two ranks recorded.
    seen = [(tmp_path / f"buffers_{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(seen[0]) == 2 and seen[0] == seen[1]
    out = tmp_path / "r.json"
    for name, key in (("best", "best"), ("last", "final")):
        assert test_tool.main(["--ckpt", str(run / f"checkpoints/{name}.pth"), "--json",
                               str(out), "--device", "cpu"]) == 0
        result = json.loads(out.read_text())
        assert (result["acc"], result["macc"]) == (metrics[f"{key}_acc"], metrics[f"{key}_macc"])


def _write_folds(root: Path, folds: int, way: int = 3) -> None:
    """Few-shot fold pickles in the official format, from synthetic shapes."""
    for fold in range(folds):
        data = {}
        for split in ("train", "test"):
            points, labels = generate(way, 8, 64, seed=fold, split=split)
            cloud = np.concatenate([points.numpy(), np.zeros_like(points.numpy())], -1)
            data[split] = [(c, int(lb), int(lb) + 10) for c, lb in zip(cloud, labels.tolist(),
                                                                         strict=True)]
        path = root / f"{way}way_8shot" / f"{fold}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(data))


def test_fewshot_folds_in_one_command_write_mean_and_std(tmp_path):
    _write_folds(tmp_path / "folds", 2)
    config = write_config(
        tmp_path / "fewshot.yaml", train={"epochs": 1},
        data={"name": "modelnet40_fewshot", "root": str(tmp_path / "folds"), "way": 3,
              "shot": 8, "fold": 0, "npoints": 64})
    run = tmp_path / "fs"
    assert train_tool.main(["--config", str(config), "--out", str(run), "--folds", "0-1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    per_fold = [json.loads((run / f"fold_{k}" / "metrics.json").read_text())["best_acc"]
                for k in (0, 1)]
    assert summary["folds"] == [0, 1] and summary["best_acc"] == per_fold
    assert summary["best_acc_mean"] == pytest.approx(np.mean(per_fold))
    assert summary["best_acc_std"] == pytest.approx(np.std(per_fold))
    assert load_config(run / "fold_1" / "config.yaml")["data"]["fold"] == 1
    # Resuming a finished few-shot run re-reads the folds instead of training again.
    assert train_tool.main(["--config", str(config), "--out", str(run), "--folds", "0-1",
                            "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text()) == summary


def test_few_shot_run_interrupted_in_a_fold_resumes_with_the_printed_command(
        tmp_path, monkeypatch, capsys):
    _write_folds(tmp_path / "folds", 2)
    config = write_config(
        tmp_path / "fewshot.yaml", train={"epochs": 1},
        data={"name": "modelnet40_fewshot", "root": str(tmp_path / "folds"), "way": 3,
              "shot": 8, "fold": 0, "npoints": 64})
    run, calls = tmp_path / "fs", []
    regularization_loss = trainer_module.regularization_loss

    def ctrl_c_in_fold_1(model):  # 24 shapes, batch 8: fold 1 starts at the 4th step
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return regularization_loss(model)

    monkeypatch.setattr(trainer_module, "regularization_loss", ctrl_c_in_fold_1)
    assert train_tool.main(["--config", str(config), "--out", str(run), "--folds", "0-1"]) == 130
    monkeypatch.undo()
    command = capsys.readouterr().err.strip().splitlines()[-1].split()
    assert command[-1] == "--resume"
    fold_0 = (run / "fold_0" / "metrics.json").read_text()
    assert train_tool.main(command[2:]) == 0
    assert (run / "fold_0" / "metrics.json").read_text() == fold_0  # kept, not retrained
    assert json.loads((run / "summary.json").read_text())["folds"] == [0, 1]


def test_stored_paths_are_absolute_so_test_py_works_from_another_folder(tmp_path,
                                                                       monkeypatch):
    _write_folds(tmp_path / "work" / "folds", 1)
    monkeypatch.chdir(tmp_path / "work")
    write_config(Path("fs.yaml"), train={"epochs": 1},
                 data={"name": "modelnet40_fewshot", "root": "folds", "way": 3, "shot": 8,
                       "fold": 0, "npoints": 64})
    assert train_tool.main(["--config", "fs.yaml", "--out", "run"]) == 0
    saved = load_config(tmp_path / "work" / "run" / "config.yaml")
    assert saved["data"]["root"] == str(tmp_path / "work" / "folds")
    assert saved["output_dir"] == str(tmp_path / "work" / "run")
    metrics = json.loads(Path("run/metrics.json").read_text())
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative "folds" no longer resolves
    out = tmp_path / "r.json"
    assert test_tool.main(["--ckpt", "work/run/checkpoints/best.pth", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["acc"] == metrics["best_acc"]


class Backwards(ClassificationTask):
    """A toy task on the synthetic shapes: twice the cross-entropy, and "best" is the epoch
    with the LOWEST accuracy (so the engine's choice shows whose rule it follows)."""

    name = "toy_backwards"
    datasets = ("synthetic",)
    log_metrics = ("acc", "err")
    best_metric = "err"
    losses: list = []

    def loss(self, output, target):
        value = 2 * super().loss(output, target)
        self.losses.append(value.item())
        return value

    def metrics(self, records, class_names):
        out = super().metrics(records, class_names)
        return {**out, "err": 100.0 - out["acc"]}


def test_a_task_registered_from_a_test_file_drives_loss_metrics_and_best(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 4, "lr": 0.05})
    try:
        register_task(Backwards)
        assert train_tool.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    finally:
        TASKS.pop(Backwards.name)
    run = tmp_path / "run"
    rows = read_log(run)
    assert len(Backwards.losses) == 4 * 6  # 48 shapes, batch 8: 6 steps per epoch
    errs = [float(r["test_err"]) for r in rows]
    assert [float(r["test_acc"]) for r in rows] == pytest.approx([100 - e for e in errs])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "toy_backwards" and metrics["best_metric"] == "err"
    assert metrics["best_epoch"] == errs.index(max(errs))
    assert metrics["best_err"] == max(errs)
    assert load_checkpoint(run / "checkpoints/best.pth")["epoch"] == metrics["best_epoch"]
    # The logged loss is the task's (twice the cross-entropy), averaged per epoch.
    assert float(rows[0]["train_loss"]) == pytest.approx(np.mean(Backwards.losses[:6]))
    assert build_task(load_config(run / "config.yaml")).name == "classification"


def test_run_on_real_modelnet40_files(shared_data, tmp_path):
    root = shared_data / "modelnet40_normal_resampled_mini"
    config = write_config(
        tmp_path / "mn40.yaml", train={"epochs": 1, "batch_size": 16},
        data={"name": "modelnet40", "root": str(root), "raw_points": 1024, "npoints": 1024})
    run = tmp_path / "mn40"
    assert train_tool.main(["--config", str(config), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "modelnet40" and 0 <= metrics["best_acc"] <= 100
    assert load_config(run / "config.yaml")["derived"] == {"model": {"cls_dim": 40}}
