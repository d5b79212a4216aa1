"""tools/compare.py: several methods, one config, a list of seeds -> one table whose numbers
are those of the runs' own metrics files, on the synthetic data with a tiny Point-MAE."""
from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml
from conftest import TINY_RUN, load_tool, merged

compare_tool = load_tool("compare")
# TINY_RUN with lora (r=2) as the config's own method, 3 classes of 6 clouds
TINY = merged(TINY_RUN, adapter={"method": "lora", "r": 2},
              data={"num_classes": 3, "samples_per_class": 6}, train={"batch_size": 6})
METHODS = ["lora", "vpt_deep:num_prompts=2,aoft=true"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = root / "out"
    code = compare_tool.main(["--config", str(config), "--methods", *METHODS,
                              "--seeds", "0", "1", "--out", str(out), "--device", "cpu"])
    assert code == 0
    return config, out


def test_table_matches_the_runs(table):
    _, out = table
    with open(out / "compare.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == METHODS
    for label, row in rows.items():
        runs = [json.loads((compare_tool.run_dir(out, label, s) / "metrics.json").read_text())
                for s in (0, 1)]
        values = [r["best_acc"] for r in runs]
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["std"]) == pytest.approx(statistics.pstdev(values))
        assert int(row["params_trainable"]) == runs[0]["parameters"]["trainable"]
    assert runs[0]["method"] == "vpt_deep"
    assert rows["lora"]["mergeable"] == "True" and rows[METHODS[1]]["mergeable"] == "False"
    # the config's own adapter options (r=2) apply to its own method only
    lora = json.loads((compare_tool.run_dir(out, "lora", 0) / "metrics.json").read_text())
    assert lora["parameters"]["trainable_no_head"] == 4 * (32 + 32) * 2 + 2 * 32  # q, k, v, proj
    md = (out / "compare.md").read_text()
    assert f"| {METHODS[1]} | " in md and "| no |" in md and "| yes |" in md


def test_seeds_differ_and_are_recorded(table):
    _, out = table
    seeds = [yaml.safe_load((compare_tool.run_dir(out, "lora", s) / "config.yaml").read_text())
             ["train"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]


def test_refusals_before_any_training(table, tmp_path, capsys):
    config, out = table
    before = sorted(p.name for p in out.iterdir())
    assert compare_tool.main(["--config", str(config), "--methods", "lora", "--out",
                              str(out)]) == 2
    assert "compare.md already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    for bad, message in [("lora:r", "key=value pairs"), ("nope", "unknown method 'nope'"),
                         ("lora:r=0", "option r must be an int >= 1")]:
        assert compare_tool.main(["--config", str(config), "--methods", bad, "--out",
                                  str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_method_config_keeps_other_options_apart():
    cfg = {"adapter": {"method": "lora", "r": 2}, "train": {"seed": 0}}
    assert compare_tool.method_config(cfg, "lora", {}, 3) == {
        "adapter": {"method": "lora", "r": 2}, "train": {"seed": 3}}
    assert compare_tool.method_config(cfg, "adapter", {"bottleneck": 4}, 1)["adapter"] == {
        "method": "adapter", "bottleneck": 4}
    assert cfg["train"]["seed"] == 0
