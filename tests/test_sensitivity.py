"""Forward sensitivity: it really quantizes each layer, restores the model, refuses bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec import CalibrationError, PolicyError
from mixprec.analysis import SensitivityTable, sensitivity


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(32, 64, generator=generator) for _ in range(3)]


def test_every_layer_and_candidate_is_measured_and_the_model_is_restored(tmp_path: Path) -> None:
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules = list(net.modules())
    table = sensitivity(net, data(), ["int8", "w4", "bf16"], progress=False)
    assert {(r.layer, r.precision) for r in table.rows} == {(n, p) for n in "024" for p in ("int8", "w4", "bf16")}
    for layer in "024":
        # Really quantized: every cost is positive, and int4 weights move the output more than int8 or bf16.
        assert 0 < table.cost(layer, "bf16") and 0 < table.cost(layer, "int8") < table.cost(layer, "w4")
        row = next(r for r in table.rows if r.layer == layer and r.precision == "w4")
        assert math.isclose(row.value, -10 * math.log10(row.cost)) and row.bytes_after < row.bytes_fp32
    assert list(net.modules()) == modules and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    table.to_json(tmp_path / "s.json")
    assert SensitivityTable.from_json(tmp_path / "s.json") == table
    assert table.to_csv().splitlines()[0].startswith("layer,module_type,precision,metric,cost")


def test_kl_and_custom_metrics() -> None:
    kl = sensitivity(model(), data(), ["w4"], metric="kl", progress=False)
    assert all(r.metric == "kl" and r.cost > 0 for r in kl.rows)

    def max_abs(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
        return max(float((o - r).abs().max()) for r, o in zip(reference, outputs))

    custom = sensitivity(model(), data(), ["w4"], metric=max_abs, progress=False)
    assert all(r.metric == "max_abs" and r.cost == r.value > 0 for r in custom.rows)


def test_bad_input_is_refused() -> None:
    with pytest.raises(CalibrationError, match="needs data"):
        sensitivity(model(), [], ["int8"])
    with pytest.raises(PolicyError, match="unknown metric 'mse'"):
        sensitivity(model(), data(), ["int8"], metric="mse")
    with pytest.raises(PolicyError, match=r"\['int8-static'\] need calibrated activations"):
        sensitivity(model(), data(), ["int8-static"])
    with pytest.raises(PolicyError, match=r"candidates \['w4g48'\] apply to no layer"):
        sensitivity(model(), data(), ["int8", "w4g48"])
    with pytest.raises(CalibrationError, match="metric returned NaN for layer '0'"):
        sensitivity(model(), data(), ["int8"], metric=lambda r, o: float("nan"), progress=False)
    with pytest.raises(PolicyError, match="unknown precision"):
        sensitivity(model(), data(), ["int3"])
