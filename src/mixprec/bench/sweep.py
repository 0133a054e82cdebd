"""Batch-size sweeps: every candidate at every batch size, interleaved, as table rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from mixprec.timing import interleaved_medians

UNITS = {"ms": 1e3, "us": 1e6}


def batch_sweep(candidates: Mapping[str, Callable[[Tensor], object]], make_input: Callable[[int], Tensor],
                batches: Sequence[int], rounds: int, baseline: str = "fp32", prefix: str = "M", unit: str = "ms",
                min_seconds: float = 0.05, settle_seconds: float = 0.0) -> tuple[list[dict[str, object]], list[str]]:
    """Time each candidate on ``make_input(batch)`` for every batch (interleaved medians).

    ``settle_seconds``: as in :func:`~mixprec.timing.interleaved_medians`.
    Returns table rows (``path``, then per batch the time in ``unit`` and the speed-up over
    ``baseline``) and their column names, e.g. ``M8_ms`` and ``M8_vs_fp32``.
    """
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates {list(candidates)}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {sorted(UNITS)}, got {unit!r}")
    medians = {}
    with torch.no_grad():
        for batch in batches:
            x = make_input(batch)
            calls = {name: (lambda f=f, x=x: f(x)) for name, f in candidates.items()}
            medians[batch] = interleaved_medians(calls, rounds, min_seconds=min_seconds, settle_seconds=settle_seconds)
    rows = []
    for name in candidates:
        row: dict[str, object] = {"path": name}
        for batch in batches:
            row[f"{prefix}{batch}_{unit}"] = round(medians[batch][name] * UNITS[unit], 3)
            row[f"{prefix}{batch}_vs_{baseline}"] = round(medians[batch][baseline] / medians[batch][name], 2)
        rows.append(row)
    columns = ["path"] + [f"{prefix}{b}_{s}" for b in batches for s in (unit, f"vs_{baseline}")]
    return rows, columns
