"""Shared fixtures: the real data folder beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIXPREC_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    folder = SHARED_DATA / "fashion-mnist"
    if not folder.is_dir():
        pytest.fail(f"test data missing: {folder} (tests need ../shared/data beside the project)")
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data root holding stsb/ and sst2/."""
    if not (SHARED_DATA / "stsb").is_dir() or not (SHARED_DATA / "sst2").is_dir():
        pytest.fail(f"test data missing: {SHARED_DATA}/stsb or /sst2 (tests need ../shared/data beside the project)")
    return SHARED_DATA
