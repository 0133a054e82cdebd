"""Per-stage figures of integer graphs and pipelines: constant bytes, output bytes per sample
and median time, as rows and as ``name,weight_bytes,activation_bytes,time`` CSV."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mixprec.errors import InputError


@dataclass(frozen=True)
class StageProfile:
    """One stage's figures: constant bytes, output bytes per sample, median seconds per batch."""

    name: str
    weight_bytes: int
    activation_bytes: int
    seconds: float


def median_seconds(steps: Sequence[tuple[Callable, tuple[int, ...]]], inputs: list, repeats: int) -> list[float]:
    """Run ``steps`` in order ``repeats`` times on ``inputs``; each step is a callable and the
    indices of the values it reads (``-1``: the previous step's output; otherwise an index into
    ``inputs`` followed by the outputs). Median seconds per step."""
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        values = list(inputs)
        for index, (step, reads) in enumerate(steps):
            args = [values[i] for i in reads]
            start = time.perf_counter()
            values.append(step(*args))
            times[index].append(time.perf_counter() - start)
    return [float(np.median(spent)) for spent in times]


def stage_table(profiles: Sequence[StageProfile]) -> str:
    """``name,weight_bytes,activation_bytes,time`` CSV lines (time in seconds)."""
    lines = ["name,weight_bytes,activation_bytes,time"]
    lines += [f"{p.name},{p.weight_bytes},{p.activation_bytes},{p.seconds:.6g}" for p in profiles]
    return "\n".join(lines) + "\n"
