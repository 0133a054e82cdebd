"""The native build's C++ standard library check: an extension that links its own copy is refused
(PyTorch paths instead of a crash on the first error message), one that links libstdc++.so is used."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mixprec.kernels import native
from mixprec.kernels.shared_object import needed_libraries, own_cxx_library

SOURCE = ("#include <sstream>\n#include <string>\n"
          "std::string label(long n) { std::ostringstream s; s << n; return s.str(); }\n")


def build(tmp_path: Path, *flags: str) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ here")
    (tmp_path / "label.cpp").write_text(SOURCE)
    out = tmp_path / f"label{len(flags)}.so"
    subprocess.run([compiler, "-shared", "-fPIC", *flags, "-o", str(out), str(tmp_path / "label.cpp")], check=True)
    return out


def test_the_built_extension_links_the_shared_cxx_library() -> None:
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    extension = Path(native._module.__file__)
    assert any(name.startswith("libstdc++.so") for name in needed_libraries(extension))
    assert native.own_cxx_library_reason(extension) is None


def test_a_statically_linked_cxx_library_is_refused_with_what_to_do(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shared = build(tmp_path)
    assert "libstdc++.so.6" in needed_libraries(shared) and not own_cxx_library(shared)
    static = build(tmp_path, "-static-libstdc++")
    assert "libc.so.6" in needed_libraries(static) and own_cxx_library(static)
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    reason = native.own_cxx_library_reason(static)
    assert "its own copy of the C++ standard library (compiler /opt/gcc/bin/g++" in reason
    assert f"CXX=g++) and delete {tmp_path} to rebuild" in reason


def test_files_that_are_not_elf_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a shared object")
    with pytest.raises(ValueError, match="notes.txt is not a 64-bit little-endian ELF file"):
        needed_libraries(text)
