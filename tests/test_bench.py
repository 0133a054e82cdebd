"""The timing and memory helpers (their inputs; no timed assertions)."""

from __future__ import annotations

import pytest
import torch

from mixprec.bench.memory import bytes_allocated
from mixprec.bench.timing import interleaved_medians


def test_interleaved_medians_times_every_candidate() -> None:
    calls = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    medians = interleaved_medians({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=3, min_seconds=0.0)
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    assert calls["a"] >= 3 + 3 + 1 and calls["b"] >= 7  # warm-up, sizing call, one timing per round


def test_interleaved_medians_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        interleaved_medians({})
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        interleaved_medians({"a": lambda: None}, rounds=0)


def test_bytes_allocated_counts_a_known_allocation() -> None:
    assert bytes_allocated(lambda: torch.empty(1000, dtype=torch.float32)) == 4000


def test_batch_sweep_rows_and_refusals() -> None:
    from mixprec.bench.sweep import batch_sweep

    candidates = {"fp32": lambda x: x * 2, "other": lambda x: x + 1}
    rows, columns = batch_sweep(candidates, lambda b: torch.zeros(b, 3), (1, 4), rounds=1, min_seconds=0.0)
    assert columns == ["path", "M1_ms", "M1_vs_fp32", "M4_ms", "M4_vs_fp32"]
    assert [r["path"] for r in rows] == ["fp32", "other"] and rows[0]["M1_vs_fp32"] == 1.0
    with pytest.raises(ValueError, match="baseline 'fp16' is not among"):
        batch_sweep(candidates, lambda b: torch.zeros(b), (1,), rounds=1, baseline="fp16")
    with pytest.raises(ValueError, match="unit must be one of"):
        batch_sweep(candidates, lambda b: torch.zeros(b), (1,), rounds=1, unit="s")
