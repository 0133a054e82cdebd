"""Freed heap memory given back to the system after quantizing and loading (mixprec.heap)."""

from __future__ import annotations

import ctypes
import gc
import importlib
import sys
from pathlib import Path

import pytest
from torch import nn

import mixprec
from mixprec import heap, serialization
from mixprec.bench.process_memory import anon_bytes

quantizing = importlib.import_module("mixprec.quantize")  # the package's quantize is the function

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None,
                           reason="needs glibc's malloc_trim (Linux)")


@glibc
def test_free_heap_pages_below_a_live_block_go_back_to_the_system() -> None:
    malloc, free = ctypes.CDLL(None).malloc, ctypes.CDLL(None).free
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
    blocks = [malloc(64 << 10) for _ in range(4096)]  # 256 MiB in blocks below glibc's mmap threshold: its heap
    for block in blocks:
        ctypes.memset(block, 1, 64 << 10)
    top = malloc(64 << 10)  # in use above them: glibc's free() alone cannot shrink the heap past it
    for block in blocks:
        free(block)
    gc.collect()
    held = anon_bytes() / 2**20
    assert heap.release_free_heap()
    released = held - anon_bytes() / 2**20
    free(top)
    assert released > 200, f"only {released:.0f} MB of 256 went back"


def test_without_malloc_trim_it_only_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_heap() is False


def test_quantize_and_load_release_the_heap_when_done(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    for module in (quantizing, serialization):
        monkeypatch.setattr(module, "release_free_heap", lambda module=module: calls.append(module.__name__))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    mixprec.quantize(model, "int8")
    assert calls == ["mixprec.quantize"]
    mixprec.save(model, tmp_path / "model.safetensors")
    mixprec.load(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), tmp_path / "model.safetensors")
    assert calls == ["mixprec.quantize", "mixprec.serialization"]
