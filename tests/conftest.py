"""Shared fixtures: the real data folder beside the project, the examples' modules."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIXPREC_TEST_DATA", ROOT.parent / "shared" / "data"))
EXAMPLES = ROOT / "examples"


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


@pytest.fixture(scope="session")
def import_example() -> Callable[[str], ModuleType]:
    """Import a module of examples/ (they import each other by plain name) without leaving
    examples/ on ``sys.path``."""
    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(EXAMPLES))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(EXAMPLES))
    return load
