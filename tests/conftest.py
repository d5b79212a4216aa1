"""Shared fixtures: reference facts kept in tests/fixtures, the real-data folder beside the
repository; `load_tool` for the scripts in tools/; the tiny run config the tool tests start
from (`TINY_RUN`, `merged`)."""
import importlib.util
from pathlib import Path

import pytest

import pointclora  # noqa: F401  (first: the OpenMP wait policy is set before torch loads)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# A depth-1 Point-MAE with CLoRA on 4 synthetic classes: a whole run takes seconds on a CPU.
TINY_RUN = {
    "model": {"name": "point_mae", "num_group": 8, "group_size": 8, "trans_dim": 32, "depth": 1,
              "num_heads": 2, "encoder_dims": 32, "drop_path_rate": 0.0, "pretrained": None},
    "adapter": {"method": "clora"},
    "data": {"name": "synthetic", "num_classes": 4, "samples_per_class": 12, "npoints": 64},
    "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "num_workers": 0},
}


def merged(base: dict, **sections) -> dict:
    """A copy of the run config ``base`` with each of ``sections`` merged into that section."""
    cfg = {k: dict(v) for k, v in base.items()}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture
def shared_data() -> Path:
    """The read-only real-data folder (`../shared/data`), or skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only present beside the repo)")
    return SHARED_DATA


@pytest.fixture
def fixtures() -> Path:
    """``tests/fixtures``: official key lists and other reference facts (see its README)."""
    return FIXTURES


def load_tool(name: str):
    """The module of `tools/<name>.py` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
