"""Quantized weights and KV caches in transparent huge pages (Linux).

A decoding step reads every weight from DRAM once. Read through 4 KiB pages, a stream of a few MB
crosses a page boundary every 4 KiB (a TLB miss each; the hardware prefetchers stop there). In 2 MiB
pages the 1.17B Llama shape's native decode step ran 1.03-1.07x faster (medians of two runs) on this
project's Zen 4 while its memory read fast, 1.01-1.02x in its slow phase; one w4a8 kernel streaming
one 128 MiB weight, 1.21x (BENCHMARKS.md: "Weights in huge pages"). Linux backs anonymous memory with
huge pages where the process asks for them (``madvise(MADV_HUGEPAGE)``) when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (a common default) and wherever it can
when it is ``always``. PyTorch's own allocator asks only when the environment variable
``THP_MEM_ALLOC_ENABLE=1`` is set before it starts.

:func:`zeros_in_huge_pages` is ``torch.zeros`` for the weight buffers of mixprec's quantized modules
and the native decoder's KV cache: from 2 MiB up it is a fresh private anonymous mapping whose whole
2 MiB pages are advised before anything touches them, so the kernel backs them with huge pages when
the codes are first written (the kernel hands out anonymous memory zero-filled: the same zeros). The
tail shorter than 2 MiB stays in 4 KiB pages, so no memory is spent beyond the tensor's bytes. The
result is an ordinary CPU tensor whose storage is that mapping, unmapped when the storage is freed.

:func:`gather_in_huge_pages` copies many tensors, small ones too, one after another into one such mapping, each
with a storage of its own: a decode step's projection codes, their scales (a few hundred KB each, so never in huge
pages alone) and biases then lie in 2 MiB pages in the order the step reads them (``NativeLlamaDecoder``).

Memory that another allocator has already written (oneDNN's packed int8 weights, which PyTorch allocates)
is moved into huge pages afterwards by :func:`collapse_into_huge_pages` (``madvise(MADV_COLLAPSE)``,
Linux 6.1 and later; the values stay as they are).

``MIXPREC_HUGE_PAGES=0`` in the environment turns both off (read at each call: plain ``torch.zeros``, no
collapse), for comparisons and for systems where huge pages are unwelcome.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

#: Bytes of one transparent huge page on x86-64, and the smallest buffer :func:`zeros_in_huge_pages` maps itself.
HUGE_PAGE_BYTES = 2 << 20

#: ``madvise``'s MADV_COLLAPSE (Linux >= 6.1; Python's ``mmap`` module names it only from 3.12 on).
MADV_COLLAPSE = 25

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


def huge_pages_wanted() -> bool:
    """Whether mixprec places memory in huge pages here: the kernel offers them (``always`` or ``madvise``) and
    ``MIXPREC_HUGE_PAGES`` is not ``0``."""
    return os.environ.get("MIXPREC_HUGE_PAGES", "1") != "0" and transparent_huge_pages() in ("always", "madvise")


def zeros_in_huge_pages(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``torch.zeros(shape, dtype=dtype)``, in memory advised for 2 MiB pages when the tensor has at least
    :data:`HUGE_PAGE_BYTES` bytes, the default device is the CPU and the kernel offers transparent huge pages
    (module docstring) and ``MIXPREC_HUGE_PAGES`` is not ``0``; otherwise ``torch.zeros`` itself."""
    shape = tuple(int(size) for size in shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"zeros_in_huge_pages needs sizes >= 0, got {shape}")
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if (nbytes < HUGE_PAGE_BYTES or torch.get_default_device().type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE")
            or not huge_pages_wanted()):
        return torch.zeros(shape, dtype=dtype)
    mapping, offset = _advised_mapping(nbytes, nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES)
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).view(shape)


def _advised_mapping(nbytes: int, advised: int) -> tuple[mmap.mmap, int]:
    """A fresh private anonymous mapping (a shared one would be shmem, under other rules) with room for ``nbytes``
    from a 2 MiB boundary, and that boundary's offset in it; the ``advised`` bytes from there on carry
    MADV_HUGEPAGE. Nothing is resident until written; where the advice is refused the memory stays in 4 KiB pages."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE)
    offset = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE_BYTES
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, advised)
    except OSError:  # advice only
        pass
    return mapping, offset


#: Where :func:`gather_in_huge_pages` starts each tensor: a multiple of this many bytes (one cache line).
GATHER_ALIGNMENT = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // GATHER_ALIGNMENT) * GATHER_ALIGNMENT


def laid_one_after_another(tensors: Sequence[Tensor]) -> bool:
    """Whether each tensor starts where the one before it ends, rounded up to :data:`GATHER_ALIGNMENT` bytes (as
    :func:`gather_in_huge_pages` lays them), so gathering them again would change nothing."""
    present = [tensor for tensor in tensors if tensor.numel()]
    return all(after.data_ptr() == before.data_ptr() + _aligned(before.nbytes)
               for before, after in zip(present, present[1:]))


def _check_gatherable(tensors: list[Tensor]) -> None:
    """Refuses what :func:`gather_in_huge_pages` cannot move, naming the entry (its own frame, so that no loop
    variable keeps an original alive while they are moved)."""
    if not isinstance(tensors, list):
        raise ValueError(f"gather_in_huge_pages takes a list of tensors (its entries are replaced), got "
                         f"{type(tensors).__name__}")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"gather_in_huge_pages takes CPU tensors; item {index} is {type(tensor).__name__}")
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or not tensor.is_contiguous():
            order = "" if tensor.is_contiguous() else ", not contiguous"
            raise ValueError(f"gather_in_huge_pages takes contiguous strided CPU tensors; tensor {index} is "
                             f"{tensor.layout} on {tensor.device}{order}")


def gather_in_huge_pages(tensors: list[Tensor], replaced: Callable[[int, Tensor], None] | None = None) -> bool:
    """Moves ``tensors`` (a list of contiguous, strided CPU tensors) one after another into one fresh mapping advised
    for 2 MiB pages, each starting at a multiple of :data:`GATHER_ALIGNMENT` bytes: ``tensors[i]`` becomes a copy
    with the same dtype, shape and values and a storage of its own over its bytes (so savers and tied-weight checks,
    which tell tensors apart by storage, see them as before), one at a time, and ``replaced(i, copy)`` is called
    right after each, for the caller to give the copy to whatever else held the original: each original can then be
    freed before the next is copied, so moving holds about one tensor's bytes more than before, not a second copy of
    them all. The mapping is unmapped when the last copy is freed. Moves nothing and returns False when huge pages
    are not wanted (:func:`huge_pages_wanted`), when the tensors hold fewer than :data:`HUGE_PAGE_BYTES` bytes in
    all, or when they already lie one after another (:func:`laid_one_after_another`); True when it moved them.
    """
    _check_gatherable(tensors)
    total = sum(_aligned(tensor.nbytes) for tensor in tensors)
    if total < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE") or not huge_pages_wanted() \
            or laid_one_after_another(tensors):
        return False
    mapping, start = _advised_mapping(total, -(-total // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES)
    with torch.inference_mode(False):  # ordinary tensors, writable later (a checkpoint loaded into them) wherever made
        for index in range(len(tensors)):
            original = tensors[index]
            copy = torch.frombuffer(mapping, dtype=original.dtype, count=original.numel(), offset=start) \
                if original.numel() else torch.empty(0, dtype=original.dtype)
            tensors[index] = copy.view(original.shape).copy_(original)
            start += _aligned(original.nbytes)
            del original, copy
            if replaced is not None:
                replaced(index, tensors[index])
    return True


def collapse_into_huge_pages(address: int, nbytes: int) -> int:
    """Asks Linux to move the whole 2 MiB pages inside ``[address, address + nbytes)``, anonymous memory this
    process has already written, into huge pages now (``madvise(MADV_COLLAPSE)``, Linux >= 6.1). Returns the bytes
    collapsed: 0 off Linux, with huge pages ``never`` or ``MIXPREC_HUGE_PAGES=0``, for ranges holding no whole huge
    page, or where the kernel refuses (an older kernel, no huge page free): best effort, the values never change."""
    if address < 0 or nbytes < 0:
        raise ValueError(f"collapse_into_huge_pages needs an address and a byte count >= 0, got {address}, {nbytes}")
    begin = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end <= begin or not huge_pages_wanted():
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return end - begin if libc.madvise(begin, end - begin, MADV_COLLAPSE) == 0 else 0
