"""Part segmentation through the engine and the tools: training, testing, the official
double optimizer step."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import load_tool

TINY = {
    "model": {"name": "point_mae_partseg", "num_group": 8, "group_size": 8, "trans_dim": 24,
              "depth": 1, "num_heads": 2, "encoder_dims": 24, "drop_path_rate": 0.0,
              "pretrained": None},
    "adapter": {"method": "lora"},
    "data": {"name": "synthetic_parts", "samples_per_category": 1, "npoints": 64,
             "num_categories": 4},
    "train": {"epochs": 2, "batch_size": 2, "lr": 2.0e-3, "warmup_epochs": 0,
              "num_workers": 0},
}
train_tool, test_tool = load_tool("train"), load_tool("test")


def write(path, **train):
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["train"].update(train)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_and_test_a_segmentation_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tool.main(["--config", str(write(tmp_path / "c.yaml")), "--out", str(run),
                            "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "part_segmentation" and metrics["best_metric"] == "ins_miou"
    assert 0 <= metrics["best_ins_miou"] <= 100 and 0 <= metrics["best_cls_miou"] <= 100
    assert (run / "per_category.png").stat().st_size > 0
    per_category = metrics["per_category_miou"]
    assert sorted(per_category) == ["Airplane", "Bag", "Cap", "Car"]
    assert all(v["shapes"] == 1 for v in per_category.values())
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"]  # lora
    assert "part segmentation" in metrics["protocol"]
    out = tmp_path / "test.json"
    capsys.readouterr()
    assert test_tool.main(["--ckpt", str(run / "checkpoints/last.pth"), "--json", str(out),
                           "--device", "cpu"]) == 0
    tested = json.loads(out.read_text())
    assert tested["ins_miou"] == pytest.approx(metrics["final_ins_miou"])  # same evaluation
    # The headline names the task's metrics, now and as saved: the mIoUs, "point accuracy".
    headline = capsys.readouterr().out.splitlines()[0]
    now, saved = headline.split("; at save time ")
    for text, value in ((now, tested), (saved, {k[6:]: v for k, v in metrics.items()
                                                 if k.startswith("final_")})):
        assert f"instance mIoU {value['ins_miou']:.2f}%" in text
        assert f"class mIoU {value['cls_miou']:.2f}%" in text
        assert f"point accuracy {value['acc']:.2f}%" in text
    assert saved.endswith("without voting")
    assert tested["per_category_miou"] == per_category
    visualize = load_tool("visualize")
    vis = tmp_path / "vis"
    assert visualize.main(["--ckpt", str(run / "checkpoints/last.pth"), "--out", str(vis),
                           "--samples", "3", "--backend", "matplotlib", "--tile", "96",
                           "--device", "cpu"]) == 0
    summary = json.loads((vis / "summary.json").read_text())
    assert summary["files"] == ["samples_000.png"] and len(summary["shape_iou"]) == 3
    assert (vis / "samples_000.png").stat().st_size > 0


@pytest.mark.parametrize("double", [False, True])
def test_official_double_step_steps_twice_per_batch(tmp_path, monkeypatch, double):
    calls = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (calls.append(1), step(self, *a, **k))[1])
    config = write(tmp_path / "c.yaml", epochs=1, double_step=double)
    assert train_tool.main(["--config", str(config), "--out", str(tmp_path / "run"),
                            "--device", "cpu"]) == 0
    assert len(calls) == (4 if double else 2)  # 4 training shapes, batch 2


def test_flops_tool_counts_the_segmentation_model(tmp_path, capsys):
    flops = load_tool("flops")
    assert flops.main(["--config", str(write(tmp_path / "c.yaml")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    from pointclora.models import build_model

    model = build_model({k: v for k, v in TINY["model"].items()})
    # lora merges back into the plain model; unmerged, its factors come on top
    assert report["merged"]["params_total"] == sum(p.numel() for p in model.parameters())
    assert report["params_total"] > report["merged"]["params_total"]
    assert report["gflops"] > 0 and "aten::embedding_bag" not in report["uncounted_ops"]
