"""A CPU without VNNI/AMX, fp16/bf16 instructions or a C++ compiler still runs every path,
gives the same results, and says which layers are slow and why."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mixprec import Policy, quantize
from mixprec.kernels import cpu, native, onednn_int8
from mixprec.kernels import w4a8_linear as w4a8

W4A8_NO_VNNI = "the native build has no AVX512-VNNI kernel (this CPU or compiler lacks it)"
PRECISIONS = ("int8", "int8-static", "int8-asym", "w8", "w4", "w4a8", "bf16", "fp16")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    # 2048 x 2048 is big enough for the prepacked oneDNN int8 path and the weight-only kernels.
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def run(precision: str, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    net = model()
    report = quantize(net, Policy(default=precision), calibration=[x])
    with torch.no_grad():
        return net(x), report


def force_bare_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "load_error", lambda: "forced off by the test")
    monkeypatch.setattr(onednn_int8, "available", lambda: False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_on_a_bare_cpu_with_the_same_results(precision: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(5, 64)
    fast, fast_report = run(precision, x)
    lacking = {"bf16": cpu.half_slow_path("bf16"), "fp16": cpu.half_slow_path("fp16"),  # what this CPU lacks
               "int8": onednn_int8.slow_path(2048, 2048),
               "w4a8": None if w4a8.blocked_native_path() else cpu.native_slow_path() or W4A8_NO_VNNI}
    expected_here = lacking.get(precision) or ""
    assert fast_report.layer("2").slow_path == expected_here
    force_bare_cpu(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"'2'.* runs? a slow path") as caught:
        slow, slow_report = run(precision, x)
    if precision.startswith("int8"):
        assert torch.equal(slow, fast)  # every int8 path gives the same bits
    elif precision in ("bf16", "fp16"):
        assert torch.equal(slow, fast)  # same PyTorch op; only the hardware behind it differs
    else:  # float32 sums in another order
        assert float((slow - fast).abs().max()) <= 2e-6 * float(fast.abs().max())
    assert slow_report.layer("2").slow_path and all("a slow path" in str(w.message) for w in caught)
    assert "SLOW" in str(slow_report)


def test_int8_without_onednn_names_the_missing_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "available", lambda: False)
    net = model()
    with pytest.warns(RuntimeWarning, match=r"layer '2' \(int8\) runs a slow path: oneDNN's prepacked int8 GEMM needs"):
        report = quantize(net, "int8")
    assert report.layer("0").slow_path == ""  # small weights use torch._int_mm anyway


def test_explain_shows_slow_paths_before_quantizing(monkeypatch: pytest.MonkeyPatch) -> None:
    force_bare_cpu(monkeypatch)
    net = model()
    before = copy.deepcopy(net.state_dict())
    report = Policy(default="w4", rules=[("0", "fp32")]).explain(net)
    assert report.layer("2").slow_path.startswith("native kernels unavailable (forced off by the test)")
    assert report.layer("0").slow_path == ""
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
