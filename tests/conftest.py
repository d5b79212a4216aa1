"""Shared fixtures: the real-data folder beside the repository, small seeds."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture
def shared_data() -> Path:
    """The read-only real-data folder (`../shared/data`), or skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only present beside the repo)")
    return SHARED_DATA


@pytest.fixture
def shared_docs() -> Path:
    """The reference docs folder (`../shared/docs`), or skip where it is absent."""
    docs = SHARED / "docs"
    if not docs.is_dir():
        pytest.skip(f"reference docs not found at {docs}")
    return docs
