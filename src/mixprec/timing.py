"""Wall-clock timing: interleaved rounds, medians, no timed assertions anywhere."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

#: A pause before each block of calls long enough for ONNX Runtime's and OpenMP's spinning threads to go
#: idle (pass as ``settle_seconds`` where such runtimes are among the candidates).
SPIN_SETTLE_SECONDS = 0.05


def _per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], rounds: int = 7,
                        min_seconds: float = 0.05, warmup: int = 3, settle_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in interleaved rounds.

    Each candidate is warmed up, then given a call count that makes one measurement last
    at least ``min_seconds``. Every round times every candidate once (the order rotates
    between rounds so none always runs first); the result is the median over rounds. As
    ``timeit`` does, Python's cyclic garbage collector is run once before and paused during
    the measurements, so collections of earlier garbage do not land in one candidate's time.

    ``settle_seconds`` > 0: before each measurement, a pause of that many seconds (thread pools that keep
    spinning after a call, as ONNX Runtime's and OpenMP's do, go idle instead of taking a core from the next
    candidate) and one untimed call (which wakes the candidate's own threads).
    """
    if not candidates:
        raise ValueError("interleaved_medians needs at least one candidate")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if settle_seconds < 0:
        raise ValueError(f"settle_seconds must be >= 0, got {settle_seconds}")
    with paused_garbage_collector():
        return _interleaved(candidates, rounds, min_seconds, warmup, settle_seconds)


@contextmanager
def paused_garbage_collector() -> Iterator[None]:
    """Run Python's cyclic garbage collector once, then keep it paused inside the block (as
    ``timeit`` does), so collections of earlier garbage do not land in a timed call."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _interleaved(candidates: Mapping[str, Callable[[], object]], rounds: int, min_seconds: float,
                 warmup: int, settle_seconds: float) -> dict[str, float]:
    calls: dict[str, int] = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        once = max(_per_call(fn, 1), 1e-7)
        calls[name] = max(1, int(min_seconds / once))
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if settle_seconds > 0:
                time.sleep(settle_seconds)
                candidates[name]()
            samples[name].append(_per_call(candidates[name], calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}
