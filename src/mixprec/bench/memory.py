"""Memory measurement of forward passes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile


def bytes_allocated(fn: Callable[[], object]) -> int:
    """Total bytes of CPU memory allocated while ``fn()`` runs (torch profiler).

    Every tensor the call creates counts, temporaries included (a dequantized weight,
    an int32 accumulator), whether or not it is freed before the call returns.
    """
    with torch.no_grad(), _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                                          profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send the process's file descriptor 2 to /dev/null inside the block: the profiler's C++
    side prints "USDT ... profiler_start/stop" lines there on every use, which no logging
    setting silences. Python exceptions still propagate (and print after the block)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
