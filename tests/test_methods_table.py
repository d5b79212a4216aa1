"""The every-method GFLOPs table: written only where asked, and the copies in the docs agree
with what tools/flops.py computes."""
import runpy
from pathlib import Path

import pytest

from pointclora.adapters import METHODS
from pointclora.analysis import methods_table
from pointclora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| method | trainable params (M, head incl.) |"
COPIES = ["README.md", "docs/tools.md", "benchmarks/results/methods_table.md"]


def method_rows(text: str) -> dict[str, str]:
    """{method: its table row} of the first methods table in a Markdown text."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows[line.split("|")[1].strip()] = line.strip()
    return rows


def test_all_methods_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    tracked = ROOT / "benchmarks/results/methods_table.md"
    before = tracked.read_bytes()
    monkeypatch.chdir(tmp_path)
    main = runpy.run_path(str(ROOT / "tools/flops.py"))["main"]
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--set", "model.cls_dim=10",
            "--all-methods"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert list(method_rows(printed)) == list(METHODS)
    assert list(tmp_path.iterdir()) == [] and tracked.read_bytes() == before
    assert main([*argv, "--table-out", "table.md"]) == 0
    assert method_rows((tmp_path / "table.md").read_text()) == method_rows(printed)


@pytest.mark.slow
def test_docs_methods_tables_match_the_tool():
    cfg = load_config(ROOT / "configs/scanobjectnn/pb_t50_rs.yaml")
    expected = method_rows(methods_table(cfg)[0])
    assert list(expected) == list(METHODS)
    for copy in COPIES:
        assert method_rows((ROOT / copy).read_text()) == expected, (
            f"{copy}: regenerate with python tools/flops.py --config "
            "configs/scanobjectnn/pb_t50_rs.yaml --all-methods")
