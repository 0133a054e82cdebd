"""Quantized weights and KV caches in transparent huge pages (Linux).

A decoding step reads every weight from DRAM once. Read through 4 KiB pages, a stream of a few MB
crosses a page boundary every 4 KiB (a TLB miss each; the hardware prefetchers stop there). In 2 MiB
pages the 1.17B Llama shape's native decode step ran 3-14% faster (7% in the median round) on this
project's Zen 4 in rounds where its memory read fast, and no differently in its slow phase
(BENCHMARKS.md: "Weights in huge pages"). Linux backs anonymous memory with huge pages where the
process asks for them (``madvise(MADV_HUGEPAGE)``) when ``/sys/kernel/mm/transparent_hugepage/enabled``
is ``madvise`` (a common default) and wherever it can when it is ``always``. PyTorch's own allocator
asks only when the environment variable ``THP_MEM_ALLOC_ENABLE=1`` is set before it starts (that also
covers oneDNN's packed int8 weights, which PyTorch allocates).

:func:`zeros_in_huge_pages` is ``torch.zeros`` for the weight buffers of mixprec's quantized modules
and the native decoder's KV cache: from 2 MiB up it is a fresh private anonymous mapping whose whole
2 MiB pages are advised before anything touches them, so the kernel backs them with huge pages when
the codes are first written (the kernel hands out anonymous memory zero-filled: the same zeros). The
tail shorter than 2 MiB stays in 4 KiB pages, so no memory is spent beyond the tensor's bytes. The
result is an ordinary CPU tensor whose storage is that mapping, unmapped when the storage is freed.
"""

from __future__ import annotations

import math
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

#: Bytes of one transparent huge page on x86-64, and the smallest buffer :func:`zeros_in_huge_pages` maps itself.
HUGE_PAGE_BYTES = 2 << 20

_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); None off Linux or when
    unreadable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = _THP_SETTING.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def zeros_in_huge_pages(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``torch.zeros(shape, dtype=dtype)``, in memory advised for 2 MiB pages when the tensor has at least
    :data:`HUGE_PAGE_BYTES` bytes, the default device is the CPU and the kernel offers transparent huge pages
    (module docstring); otherwise ``torch.zeros`` itself."""
    shape = tuple(int(size) for size in shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"zeros_in_huge_pages needs sizes >= 0, got {shape}")
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if (nbytes < HUGE_PAGE_BYTES or torch.get_default_device().type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE")
            or transparent_huge_pages() not in ("always", "madvise")):
        return torch.zeros(shape, dtype=dtype)
    # Private anonymous memory (a shared mapping would be shmem, under other rules), untouched: nothing resident yet.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE)
    offset = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE_BYTES
    mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES)
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).view(shape)
