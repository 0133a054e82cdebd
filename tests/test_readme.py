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
