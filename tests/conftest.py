"""Shared fixtures: reference facts kept in tests/fixtures, the real-data folder beside the
repository; `load_tool` for the scripts in tools/."""
import importlib.util
from pathlib import Path

import pytest

import pointclora  # noqa: F401  (first: the OpenMP wait policy is set before torch loads)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
