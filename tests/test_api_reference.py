"""The API reference builds from the docstrings, so it cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "api_reference.py"


def test_api_reference_builds_and_documents_the_entry_points(tmp_path: Path) -> None:
    pytest.importorskip("pdoc")
    spec = importlib.util.spec_from_file_location("api_reference", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "site"
    (out).mkdir()
    (out / "stale.html").write_text("from an earlier build")
    pages = tool.build(out)
    names = {page.relative_to(out).as_posix() for page in pages}
    assert "stale.html" not in names and "index.html" in names
    for module in (*tool.MODULES[1:], "mixprec.quantize", "mixprec.export"):
        assert module.replace(".", "/") + ".html" in names, module
    top = (out / "mixprec.html").read_text(encoding="utf-8")
    for entry in ("quantize", "prepare_qat", "Policy", "export", "save", "load"):
        assert f'id="{entry}"' in top, entry
    assert "Quantize <code>model</code> in place according to <code>policy</code>" in top
    qat = (out / "mixprec" / "qat.html").read_text(encoding="utf-8")
    assert "straight-through" in qat.lower() and 'id="to_float"' in qat
    assert not list(tmp_path.glob(".site-*"))  # the staging folder is gone
