"""Engine parts: schedule, optimiser groups, checkpoints and RNG, run dirs, logs, evaluation."""
import csv
import random

import numpy as np
import pytest
import torch
from torch import nn

from pointclora.engine.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from pointclora.engine.distributed import DistInfo, init_distributed
from pointclora.engine.evaluate import accuracy, predict
from pointclora.engine.optim import build_optimizer, param_groups
from pointclora.engine.plots import confusion_matrix, plot_confusion, plot_curves
from pointclora.engine.recorder import Recorder
from pointclora.engine.rundir import prepare_run_dir
from pointclora.engine.schedule import OfficialCosineLR, build_scheduler, official_lr

OFFICIAL = dict(lr=5e-4, epochs=300, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-6)
TRAIN_CFG = {"lr": 5e-4, "weight_decay": 0.05, "epochs": 300, "warmup_epochs": 10,
             "warmup_lr": 1e-6, "min_lr": 1e-6}


# --- schedule ---------------------------------------------------------------------------

@pytest.mark.parametrize("epoch, expected, rel", [
    (0, 1e-6, 1e-9), (1, 1e-6, 1e-9), (2, 5.09e-5, 1e-3), (10, 4.50e-4, 2e-3),
    (11, 4.986e-4, 1e-4), (150, 2.53e-4, 2e-3), (300, 1.0e-6, 2e-2),
])
def test_official_schedule_values(epoch, expected, rel):
    assert official_lr(epoch, **OFFICIAL) == pytest.approx(expected, rel=rel)


def test_peak_is_epoch_11_and_curve_matches_timm_stepped_like_the_official_loop():
    # The official loop: the lr in force during epoch e, then scheduler.step(e) after it.
    from timm.scheduler import CosineLRScheduler

    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=5e-4)
    ref_sched = CosineLRScheduler(opt, t_initial=300, lr_min=1e-6, warmup_lr_init=1e-6,
                                  warmup_t=10, cycle_limit=1, t_in_epochs=True)
    reference = []
    for epoch in range(301):
        reference.append(opt.param_groups[0]["lr"])
        ref_sched.step(epoch)
    ours = [official_lr(e, **OFFICIAL) for e in range(301)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=0)
    assert int(np.argmax(ours)) == 11


def test_scheduler_steps_per_epoch_and_resumes_from_state():
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(nn.ParameterList(params), TRAIN_CFG)
    sched = build_scheduler(opt, TRAIN_CFG)
    seen = []
    for _ in range(13):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [lrs[0] for lrs in seen] == pytest.approx([official_lr(e, **OFFICIAL)
                                                      for e in range(13)])
    assert all(lrs[0] == lrs[1] for lrs in seen)  # both weight-decay groups follow the curve
    # A fresh optimiser/scheduler pair loaded from state continues the same curve.
    opt2 = build_optimizer(nn.ParameterList(params), TRAIN_CFG)
    sched2 = OfficialCosineLR(opt2, 300, 10, 1e-6, 1e-6)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(official_lr(18, **OFFICIAL))


# --- optimiser groups -------------------------------------------------------------------

class Toy(nn.Module):
    """Parameters named like the official model: tokens, norms, linears, a frozen part."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, 8))
        self.encoder = nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8))
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(()))
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def test_param_groups_follow_the_official_rule():
    model = Toy()
    decay, skip = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and skip["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["cls_pos", "encoder.0.weight", "qkv.weight", "head.weight"])
    assert sorted(names[id(p)] for p in skip["params"]) == sorted(
        ["cls_token", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias", "norm.weight",
         "norm.bias", "head.bias", "scale"])
    # Frozen parameters never reach the optimiser.
    grouped = {id(p) for g in (decay, skip) for p in g["params"]}
    assert all(id(p) not in grouped for p in model.frozen.parameters())


def test_weight_decay_really_applies_only_to_decayed_group():
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(model, {**TRAIN_CFG, "lr": 0.1})
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.allclose(model.cls_pos, torch.full_like(model.cls_pos, 1 - 0.1 * 0.05))
    assert torch.equal(model.cls_token, torch.ones_like(model.cls_token))
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.05)


# --- checkpoints and RNG ----------------------------------------------------------------

def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    seed_everything(123)
    draws()
    save_checkpoint({"config": {}, "rng": rng_state(), "epoch": 4}, tmp_path / "c.pth")
    expected = draws()
    seed_everything(999)
    ckpt = load_checkpoint(tmp_path / "c.pth")
    set_rng_state(ckpt["rng"])
    assert draws() == expected
    assert ckpt["epoch"] == 4
    assert not (tmp_path / "c.pth.tmp").exists()


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"base_model": {}}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="model.pretrained"):
        load_checkpoint(tmp_path / "official.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")


# --- run directories --------------------------------------------------------------------

def test_run_dir_refuses_existing_run_unless_told(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run)                      # new: created
    prepare_run_dir(run)                      # only empty folders in it: still fine
    (run / "metrics.json").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_run_dir(run)
    assert (run / "metrics.json").read_text() == "x"  # nothing touched
    prepare_run_dir(run, exist_ok=True)
    with pytest.raises(FileNotFoundError, match="last.pth"):
        prepare_run_dir(run, resume=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pth").write_bytes(b"")
    assert prepare_run_dir(run, resume=True) == run
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a directory"):
        prepare_run_dir(tmp_path / "file")


# --- recorder and plots -----------------------------------------------------------------

def rows(epochs):
    return [{"epoch": e, "lr": 1e-4 * (e + 1), "train_loss": 2.0 / (e + 1), "train_acc": 10.0 * e,
             "test_acc": 20.0 + e if e % 2 else None, "epoch_time": 0.5} for e in epochs]


def test_recorder_writes_csv_and_tensorboard_and_resumes(tmp_path):
    rec = Recorder(tmp_path)
    for row in rows(range(4)):
        rec.log_epoch(row)
    rec.close()
    # Resume from epoch 2: rows 2 and 3 of the first attempt are replaced.
    rec = Recorder(tmp_path, start_epoch=2)
    assert [r["epoch"] for r in rec.rows] == [0, 1]
    for row in rows(range(2, 5)):
        rec.log_epoch({**row, "train_loss": -1.0})
    rec.close()
    with open(tmp_path / "log.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [0, 1, 2, 3, 4]
    assert [float(r["train_loss"]) for r in table] == [2.0, 1.0, -1.0, -1.0, -1.0]
    assert table[0]["test_acc"] == "" and float(table[1]["test_acc"]) == 21.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    plot_curves(rec.rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_disabled_recorder_writes_nothing(tmp_path):
    rec = Recorder(tmp_path, enabled=False)
    rec.log_epoch(rows([0])[0])
    rec.close()
    assert list(tmp_path.iterdir()) == []


def test_confusion_matrix_against_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    matrix = confusion_matrix(labels, preds, 5)
    brute = np.zeros((5, 5), dtype=int)
    for t, p in zip(labels, preds, strict=True):
        brute[t, p] += 1
    assert np.array_equal(matrix, brute)
    plot_confusion(matrix, list("abcde"), tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


# --- evaluation -------------------------------------------------------------------------

class Points(torch.utils.data.Dataset):
    def __init__(self, n=23):
        g = torch.Generator().manual_seed(0)
        self.points = torch.randn(n, 16, 3, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        return self.points[i], int(self.labels[i])


class MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x.mean(1))


def test_predict_matches_direct_forward_and_keeps_order():
    torch.manual_seed(0)
    model, data = MeanHead(), Points()
    logits, labels = predict(model, data, lambda x: x, DistInfo(), batch_size=5)
    assert torch.equal(labels, data.labels)
    assert torch.allclose(logits, model(data.points), atol=1e-6)
    assert accuracy(logits, labels) == pytest.approx(
        100.0 * (model(data.points).argmax(1) == data.labels).float().mean().item())


def test_predict_voting_averages_views_and_is_seeded():
    torch.manual_seed(0)
    model, data = MeanHead(), Points()

    def jitter(x):
        return x + torch.randn_like(x)

    before = torch.get_rng_state()
    a, _ = predict(model, data, lambda x: x, DistInfo(), 4, views=3, vote_transform=jitter, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # training RNG untouched
    b, _ = predict(model, data, lambda x: x, DistInfo(), 4, views=3, vote_transform=jitter, seed=7)
    assert torch.equal(a, b)
    # Reference: the same seeded draws, in the same order, averaged by hand.
    torch.manual_seed(7)
    expected = []
    for start in range(0, len(data), 4):
        batch = data.points[start:start + 4]
        expected.append(sum(model(jitter(batch)) for _ in range(3)) / 3)
    assert torch.allclose(a, torch.cat(expected), atol=1e-6)
    with pytest.raises(ValueError, match="views"):
        predict(model, data, lambda x: x, DistInfo(), 4, views=0)


def test_single_process_dist_info(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")


# --- few-shot fold lists ----------------------------------------------------------------

def test_parse_folds():
    from pointclora.engine.fewshot import parse_folds

    assert parse_folds("0-9") == list(range(10))
    assert parse_folds("3") == [3]
    assert parse_folds("2-4,7, 3") == [2, 3, 4, 7]
    for bad in ("", "a", "5-2", "-1", "1-", "0-9x"):
        with pytest.raises(ValueError, match="--folds"):
            parse_folds(bad)


# --- model part of checkpoints ----------------------------------------------------------

TINY_MODEL = {"name": "point_mae", "cls_dim": 3, "num_group": 4, "group_size": 8, "trans_dim": 16,
              "depth": 1, "num_heads": 2, "encoder_dims": 16, "drop_path_rate": 0.0,
              "pretrained": None}


@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "pretrained"])
@pytest.mark.parametrize("method", ["full", "linear", "lora", "clora", "serial_lora", "aoft"])
def test_checkpoint_rebuilds_the_trained_model(tmp_path, method, pretrained):
    from pointclora.engine.build import build_run_model
    from pointclora.engine.checkpoint import model_payload, restore_model
    from pointclora.models import build_model

    torch.manual_seed(0)
    cfg = {"model": dict(TINY_MODEL), "adapter": {"method": method}}
    if pretrained:
        path = tmp_path / "finetuned.pth"
        torch.save({"base_model": build_model(cfg["model"]).state_dict()}, path)
        cfg["model"]["pretrained"] = str(path)
    model, init = build_run_model(cfg)
    # "Training": move every trainable tensor and the live BatchNorm statistics.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    model(torch.randn(4, 64, 3))
    save_checkpoint({"config": cfg, "epoch": 0, "method": method,
                     **model_payload(model, cfg, init)},
                    tmp_path / "ckpt.pth")
    ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    torch.manual_seed(1)  # a different random init must not matter
    restored, _ = restore_model(cfg, ckpt)
    expected, got = model.state_dict(), restored.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # PEFT checkpoints with a pretrained file hold the adapter only.
    assert ("base_model" in ckpt) == (method == "full" or not pretrained)
    points = torch.randn(2, 64, 3)
    model.eval(), restored.eval()
    assert torch.equal(model(points), restored(points))
    other = dict(cfg, adapter={"method": "lora" if method != "lora" else "clora"})
    with pytest.raises(ValueError, match="adapter.method"):
        restore_model(other, ckpt)


# --- tasks, derived settings, paths -----------------------------------------------------

def test_classification_metrics_against_loops_with_an_absent_class():
    from pointclora.engine.tasks import ClassificationTask

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[labels == 2] = 3  # class 2 has no test sample
    logits = torch.randn(60, 5, generator=g)  # 5 classes, class 4 never a label either
    metrics = ClassificationTask().metrics({"logits": logits, "label": labels}, list("abcde"))
    pred = logits.argmax(1).tolist()
    per_class = []
    for c in range(5):
        idx = [i for i in range(60) if labels[i] == c]
        per_class.append(100.0 * sum(pred[i] == c for i in idx) / len(idx) if idx else None)
    assert metrics["per_class_acc"] == pytest.approx(per_class)
    assert metrics["acc"] == accuracy(logits, labels)
    assert metrics["macc"] == pytest.approx(np.mean([a for a in per_class if a is not None]))
    assert metrics["confusion"].sum() == 60 and metrics["confusion"][2].sum() == 0
    details = ClassificationTask().details(metrics, list("abcde"))
    assert details["per_class_acc"]["c"] == {"acc": None, "samples": 0}


class FakeData(list):
    num_classes = 7


def test_derived_settings_are_returned_not_written_into_the_config():
    from pointclora.engine.build import model_config, resolve_config

    cfg = {"model": {"name": "point_mae", "cls_dim": None}, "data": {"name": "synthetic"},
           "adapter": {"method": "lora"}}
    before = {k: dict(v) for k, v in cfg.items()}
    resolved = resolve_config(cfg, {"test": FakeData([1])})
    assert cfg == before  # the user's config is untouched
    assert resolved["derived"] == {"model": {"cls_dim": 7}}
    assert resolved["model"]["cls_dim"] is None and model_config(resolved)["cls_dim"] == 7
    cfg["model"]["cls_dim"] = 7
    assert resolve_config(cfg, {"test": FakeData([1])})["derived"] == {}
    cfg["model"]["cls_dim"] = 40
    with pytest.raises(ValueError, match="model.cls_dim=7"):
        resolve_config(cfg, {"test": FakeData([1])})


def test_absolute_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    from pointclora.engine.build import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = {"model": {"pretrained": "w/pre.pth"}, "data": {"root": "data", "cache_dir": None},
           "output_dir": "runs/x"}
    out = absolute_paths(cfg)
    assert out == {"model": {"pretrained": str(tmp_path / "w/pre.pth")},
                   "data": {"root": str(tmp_path / "data"), "cache_dir": None},
                   "output_dir": str(tmp_path / "runs/x")}
    assert cfg["data"]["root"] == "data"
    assert absolute_paths(out) == out


def test_random_backbone_warning_only_for_peft_without_weights():
    from pointclora.engine.build import run_warnings

    def cfg(method, pretrained):
        return {"adapter": {"method": method}, "model": {"pretrained": pretrained},
                "data": {"name": "modelnet40"}}

    assert "RANDOMLY INITIALISED" in run_warnings(cfg("clora", None))[0]
    assert "linear" in run_warnings(cfg("linear", None))[0]
    assert run_warnings(cfg("full", None)) == []
    assert run_warnings(cfg("clora", "pretrain.pth")) == []


@pytest.mark.parametrize("data, options, expected, not_expected", [
    ("modelnet40", {}, ["accuracy", "near chance", "3.45% measured on ModelNet40"], ["mIoU"]),
    ("modelnet40", {"num_category": 10}, ["accuracy", "near chance"], ["ModelNet40"]),
    ("scanobjectnn", {}, ["accuracy", "near chance"], ["ModelNet40", "mIoU"]),
    ("vtab1k", {}, ["accuracy", "near chance"], ["ModelNet40", "mIoU"]),
    ("shapenetpart", {}, ["part mIoU"], ["accuracy", "chance", "ModelNet40"]),
])
def test_random_backbone_warning_speaks_of_the_run_task(data, options, expected, not_expected):
    """The ModelNet40 figure only where it was measured; each task's own metric."""
    from pointclora.engine.build import run_warnings

    cfg = {"adapter": {"method": "lora"}, "model": {"pretrained": None},
           "data": {"name": data, **options}}
    (warning,) = run_warnings(cfg)
    assert all(text in warning for text in expected), warning
    assert not any(text in warning for text in not_expected), warning


def test_a_dataset_belongs_to_one_task():
    from pointclora.engine.tasks import ClassificationTask, register_task, task_name

    class Claims(ClassificationTask):
        name = "claims_a"
        datasets = ("some_data",)

    class Again(ClassificationTask):
        name = "claims_b"
        datasets = ("some_data",)

    from pointclora.engine.tasks import TASKS
    try:
        register_task(Claims)
        assert task_name({"data": {"name": "some_data"}}) == "claims_a"
        assert task_name({"data": {"name": "modelnet40"}}) == "classification"
        with pytest.raises(ValueError, match="claims_a"):
            register_task(Again)
    finally:
        TASKS.pop("claims_a", None)


def test_voting_names_say_how_the_number_was_obtained():
    from pointclora.engine.evaluate import voting_name

    assert voting_name(1, 1) == "none (single pass)"
    assert voting_name(10, 1) == "10-view voting"
    assert voting_name(10, 300).startswith("best of 300 repeats of 10-view voting")
