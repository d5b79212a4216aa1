"""tools/train.py without training: --print-config and --list-configs."""
import runpy
from pathlib import Path

import yaml

from pointclora.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _main():
    return runpy.run_path(str(ROOT / "tools/train.py"))["main"]


def test_print_config_prints_the_resolved_config_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--out", str(out),
            "--set", "train.lr=0.01", "adapter.r=4", "--print-config"]
    assert _main()(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(ROOT / "configs/demo.yaml", ["train.lr=0.01", "adapter.r=4"])
    assert printed == {**expected, "output_dir": str(out)}
    assert printed["train"]["lr"] == 0.01 and printed["train"]["batch_size"] == 32  # a default
    assert not out.exists()


def test_list_configs_names_every_shipped_config_with_its_header(capsys):
    assert _main()(["--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "_base_" not in p.parts)
    assert [ln.split()[0] for ln in lines] == [p.relative_to(ROOT).as_posix() for p in shipped]
    for line, path in zip(lines, shipped, strict=True):
        header = path.read_text().splitlines()[0].lstrip("# ")
        assert line.split(None, 1)[1] == header
    assert any(ln.startswith("configs/demo.yaml ") and "Quick demo" in ln for ln in lines)
