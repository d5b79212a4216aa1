"""The README's Python snippet and the scripts in examples/ run as written."""
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_python_snippet_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README has no Python snippet"
    for i, code in enumerate(blocks):
        (tmp_path / f"snippet{i}.py").write_text(code)
        _run([f"snippet{i}.py"], tmp_path)
    saved = torch.load(tmp_path / "clora.pth", weights_only=True)
    assert saved["method"] == "clora" and saved["state_dict"]


def test_finetune_example_trains_merges_and_reloads(tmp_path):
    out = _run([str(ROOT / "examples/finetune_clora.py"), "--steps", "6", "--batch-size", "8",
                "--samples-per-class", "4", "--out", str(tmp_path)], ROOT)
    assert (tmp_path / "clora.pth").is_file()
    assert re.search(r"merged model agrees on (\d+)/\1;", out), out
    assert "reloaded adapter reproduces 100.0% of the predictions" in out, out
