"""The timing and memory helpers (their inputs; no timed assertions)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mixprec.bench import encoder
from mixprec.bench.encoder import EncoderShape
from mixprec.bench.memory import bytes_allocated
from mixprec.bench.peers import build_peer
from mixprec.bench.profiling import self_cpu_ms_per_call
from mixprec.cli import main
from mixprec.timing import interleaved_medians


def test_interleaved_medians_times_every_candidate() -> None:
    calls = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    medians = interleaved_medians({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=3, min_seconds=0.0)
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    assert calls["a"] >= 3 + 3 + 1 and calls["b"] >= 7  # warm-up, sizing call, one timing per round


def test_interleaved_medians_settles_before_each_measurement() -> None:
    """With settle_seconds, every measurement follows a pause and one untimed call: per candidate, warm-up 3,
    the sizing call, then per round one untimed call and (min_seconds 0) one timed call."""
    calls = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    interleaved_medians({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=4, min_seconds=0.0,
                        settle_seconds=0.001)
    assert calls == {"a": 3 + 1 + 4 * 2, "b": 3 + 1 + 4 * 2}


def test_interleaved_medians_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        interleaved_medians({})
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        interleaved_medians({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="settle_seconds must be >= 0"):
        interleaved_medians({"a": lambda: None}, settle_seconds=-1)


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


def test_bench_linear_command_writes_every_mixprec_path(tmp_path: Path) -> None:
    out = tmp_path / "linear.csv"
    assert main(["bench", "linear", "--features", "64", "--rounds", "1", "--csv", str(out)]) == 0
    paths = {row["path"] for row in csv.DictReader(out.open())}
    assert {"fp32", "mixprec int8", "mixprec w8", "mixprec w4", "mixprec w4a8", "mixprec bf16", "mixprec fp16"} <= paths
    assert {"fp32, compiled", "mixprec int8, compiled", "mixprec w8, compiled", "mixprec w4, compiled",
            "mixprec w4a8, compiled"} <= paths


ORT_PEER = "ONNX Runtime dynamic int8 (its quantize_dynamic)"


def test_encoder_bench_measures_speed_error_and_memory_of_a_tiny_encoder() -> None:
    shape = EncoderShape(layers=1, hidden=64, heads=4, ffn=128, batch=2, seq=8)
    rows, failures = encoder.run(shape, rounds=1, memory=True,
                                 only=["mixprec int8", "mixprec w4", "mixprec int8, compiled", ORT_PEER])
    by_path = {row["path"]: row for row in rows}
    assert not [name for name in failures if name.startswith(("fp32", "mixprec", "ONNX"))], failures
    assert by_path["fp32"]["max_rel_error"] == 0.0 and by_path["fp32"]["vs_fp32"] == 1.0
    int8 = by_path["mixprec int8"]
    assert 0 < int8["max_rel_error"] < 0.05  # per-token int8 through one block: measured 0.006
    assert int8["steady_bytes"] > 0 and by_path["fp32"]["steady_bytes"] > 0
    compiled = by_path["mixprec int8, compiled"]  # the same layers; inductor fuses the float operators around them
    assert 0 < compiled["max_rel_error"] < 0.05 and compiled["steady_bytes"] == ""
    assert 0 < by_path[ORT_PEER]["max_rel_error"] < 0.01  # per-tensor uint8 activations: measured 0.0030 (VNNI), 0.0034
    # (AVX2, where the peer takes 7-bit weights as ONNX Runtime advises; 0.054 with 8-bit ones)
    assert set(by_path) == {"fp32", "mixprec int8", "mixprec w4", "mixprec int8, compiled", ORT_PEER}
    assert "best mixprec path" in encoder.summary(rows)
    with pytest.raises(ValueError, match="unknown encoder paths"):
        encoder.run(shape, rounds=1, only=["mixprec int3"])
    with pytest.raises(ValueError, match="needs a model with an nn.Linear"):
        build_peer(ORT_PEER, torch.nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match=r"takes \[rows, features\] or \[batch, seq, features\], got 1-D"):
        build_peer(ORT_PEER, torch.nn.Linear(4, 3))(torch.zeros(4))


def test_bench_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench", "linear", "--rounds", "0"], ["bench", "attention"], ["bench", "linear", "--features", "-4"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "encoder", "--rounds", "1", "--no-memory", "--paths", "mixprec int8;mixprec int3"]) == 2
    assert "unknown encoder paths ['mixprec int3']; choose from" in capsys.readouterr().err


def test_interleaved_medians_pauses_the_garbage_collector_while_timing() -> None:
    import gc

    from mixprec.timing import interleaved_medians

    seen: list[bool] = []
    interleaved_medians({"probe": lambda: seen.append(gc.isenabled())}, rounds=2, min_seconds=0.0, warmup=1)
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        interleaved_medians({"probe": lambda: None}, rounds=1, min_seconds=0.0, warmup=0)
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_memory_measurement_prints_nothing_and_still_counts(capfd: pytest.CaptureFixture[str]) -> None:
    assert bytes_allocated(lambda: torch.zeros(1000)) == 4000
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "profiler_st" not in out + err


def test_the_cnn_benchmark_refuses_a_path_it_does_not_have() -> None:
    """``benchmarks/cnn.py --paths`` names the paths to time; a part matching none is refused before any
    training, with the names it could have been."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cnn.py"
    done = subprocess.run([sys.executable, str(script), "--paths", "engine,bogus"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "--paths: 'bogus' names none of the paths" in done.stderr and "ONNX Runtime static int8" in done.stderr


def test_the_operator_profile_counts_a_call_and_refuses_bad_counts() -> None:
    x = torch.ones(64, 64)
    rows = dict(self_cpu_ms_per_call(lambda: torch.mm(x, x), calls=3, warmup=1))
    assert "aten::mm" in rows and rows["aten::mm"] > 0
    with pytest.raises(ValueError, match="calls must be >= 1 and warmup >= 0, got calls=0"):
        self_cpu_ms_per_call(lambda: None, calls=0)
    with pytest.raises(ValueError, match="got calls=1, warmup=-1"):
        self_cpu_ms_per_call(lambda: None, calls=1, warmup=-1)
