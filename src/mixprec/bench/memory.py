"""Memory measurement of forward passes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def bytes_allocated(fn: Callable[[], object]) -> int:
    """Total bytes of CPU memory allocated while ``fn()`` runs (torch profiler).

    Every tensor the call creates counts, temporaries included (a dequantized weight,
    an int32 accumulator), whether or not it is freed before the call returns.
    """
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
