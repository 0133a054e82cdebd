"""The README's quick start runs as pasted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_as_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quick start", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "mlp.safetensors").is_file()
    assert "w4g32" in capsys.readouterr().out


def test_qat_example_runs_as_pasted(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text(encoding="utf-8").split("## Training through a policy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    exec(compile(code, "README QAT example", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "w4g16" in out and "int8" in out


def _python_blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[:match.start()].count("\n") + 1, match.group(1))
            for match in re.finditer(r"```python\n(.*?)```", text, re.DOTALL)]


def _dotted(node: object) -> str | None:
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def test_every_python_block_compiles_and_names_only_what_exists() -> None:
    """The snippets that need a model of the reader's (``model``, a hub name) cannot run here;
    each still parses, and every mixprec module, function and class it imports or names exists."""
    import ast
    import importlib

    blocks = _python_blocks()
    assert len(blocks) >= 10
    checked = 0
    for line, code in blocks:
        tree = ast.parse(code, filename=f"README.md:{line}")
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mixprec"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("mixprec"))
            elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
                dotted = _dotted(node)
                if dotted and dotted.startswith("mixprec."):
                    names.add(dotted)
        for name in sorted(names):
            parts = name.split(".")
            target = importlib.import_module(parts[0])
            for depth, part in enumerate(parts[1:], start=2):
                if hasattr(target, part):
                    target = getattr(target, part)
                    continue
                try:  # a submodule not imported yet
                    target = importlib.import_module(".".join(parts[:depth]))
                except ImportError:
                    pytest.fail(f"the Python block at README.md:{line} names {name}, which does not exist")
            checked += 1
    assert checked >= 20
