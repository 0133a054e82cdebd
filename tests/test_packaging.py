"""What a wheel of mixprec holds: the native kernels' sources, compiled on first use."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mixprec.kernels import native

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_holds_every_source_and_header_of_the_native_kernels(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # the build backend, used without isolation (no download)
    project = tmp_path / "project"  # a clean copy: no build/ folder left from an earlier build
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path), str(project)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed: {built.stderr[-2000:]}")
    (wheel,) = tmp_path.glob("mixprec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = native._SOURCES[0].parent
    wanted = [path.name for path in native._SOURCES] + [path.name for path in csrc.glob("*.h")]
    missing = [name for name in wanted if f"mixprec/kernels/csrc/{name}" not in names]
    assert not missing, f"the wheel lacks {missing}"
