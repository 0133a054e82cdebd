"""Giving freed heap memory back to the system after quantizing or loading.

Quantizing a model frees its float weights and many temporaries (blocks of rows rounded at a time, scales, packed
codes). glibc's allocator serves allocations below its mmap threshold (128 KiB at first, raised up to 32 MiB as
mmapped blocks are freed) from its heap and keeps the heap's free pages when they lie below a block still in use:
the process's resident memory then stays well above what the model holds. ``quantize``, ``load``, loading through
``MixprecConfig`` and ``NativeLlamaDecoder`` therefore end with :func:`release_free_heap`: the 1.17B Llama shape of
``benchmarks/decode.py`` quantized to ``int8`` left its process 624 MiB above the model's tensors and the process's
start without it, 81 MiB with it (5-90 ms); ``w4a8g32 / head int8`` 92 and 77 MiB (``benchmarks/resident_memory.py``;
BENCHMARKS.md, "Resident memory after quantizing").
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` in this process, or None (another C library, or not Linux)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such function; no C library to open (Windows)
        return None
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Asks the C library to return the whole free pages of its heap to the system (glibc's ``malloc_trim(0)``:
    the pages are released with ``madvise(MADV_DONTNEED)``; nothing in use moves or changes). Returns whether it
    could ask: False where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
