"""Where a call spends its time, per operator: PyTorch's profiler, self CPU time per call.

Self time counts each operator's own time, not its children's, so the rows add up to the
profiled calls' wall time on the calling thread (work on other threads is inside the operator
that waited for it). Compiled graphs show as their ``## Call CompiledFxGraph ...`` row (the
graph's wrapper and inductor's fused kernels) beside the operators they call.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import profile


def self_cpu_ms_per_call(call: Callable[[], object], calls: int, warmup: int = 2) -> list[tuple[str, float]]:
    """``(operator, self CPU ms per call)`` for every operator ``calls`` calls of ``call`` ran, largest
    first, after ``warmup`` unprofiled calls."""
    if calls < 1 or warmup < 0:
        raise ValueError(f"calls must be >= 1 and warmup >= 0, got calls={calls}, warmup={warmup}")
    for _ in range(warmup):
        call()
    with profile() as prof:
        for _ in range(calls):
            call()
    events = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    return [(event.key, event.self_cpu_time_total / calls / 1e3) for event in events]


def print_profile(title: str, rows: list[tuple[str, float]], top: int) -> None:
    """The ``top`` largest rows of :func:`self_cpu_ms_per_call` as CSV lines under a title with the total."""
    print(f"{title}: self CPU ms per call ({sum(ms for _, ms in rows):.2f} in all)")
    for name, ms in rows[:top]:
        print(f"{name},{ms:.2f}")
