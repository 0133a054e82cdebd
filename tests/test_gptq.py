"""GPTQ weight rounding: exact where the theory says so, better where it should be."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixprec
from mixprec import CalibrationError, Policy, PolicyError
from mixprec.formats import QuantSpec, dequantize, qparams_from_tensor, quantize
from mixprec.gptq import HessianAccumulator, gptq_quantize

CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0)
GROUP = QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=16)


def correlated_inputs(rows: int = 600, features: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    return torch.randn(rows, features, generator=generator) @ mixing


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ (approx - weight).t()) ** 2).mean())


def test_diagonal_hessian_gives_round_to_nearest_exactly() -> None:
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    codes, qp = gptq_quantize(weight, torch.eye(32) * 3.0, CHANNEL, damp=0.0)
    rtn = qparams_from_tensor(weight, CHANNEL)
    assert torch.equal(codes, quantize(weight, rtn)) and torch.equal(qp.scale, rtn.scale)


@pytest.mark.parametrize("spec", [CHANNEL, GROUP])
def test_gptq_lowers_the_output_error_on_correlated_inputs(spec: QuantSpec) -> None:
    x = correlated_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    accumulator = HessianAccumulator(64)
    accumulator.observe(x[:300])
    accumulator.observe(x[300:])
    codes, qp = gptq_quantize(weight, accumulator.value(), spec)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    gptq_error = output_error(x, weight, dequantize(codes, qp))
    rtn = qparams_from_tensor(weight, spec)
    rtn_error = output_error(x, weight, dequantize(quantize(weight, rtn), rtn))
    assert gptq_error < 0.6 * rtn_error  # measured 0.47 (group) and 0.52 (channel)


def test_accumulator_refuses_bad_inputs() -> None:
    accumulator = HessianAccumulator(4)
    with pytest.raises(CalibrationError, match="4 features"):
        accumulator.observe(torch.zeros(2, 5))
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        accumulator.observe(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(CalibrationError, match="no calibration rows"):
        accumulator.value()


def test_quantize_with_gptq_reports_it_and_needs_calibration() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.Embedding(5, 16))
    policy = Policy([("0", "w4g16"), ("2", "int8"), ("3", "int8")])
    with pytest.raises(CalibrationError, match="GPTQ weight rounding for layers \\('0', '2'\\)"):
        mixprec.quantize(model, policy, weight_rounding="gptq")
    with pytest.raises(PolicyError, match="unknown weight_rounding 'awq'; choose one of nearest, gptq"):
        mixprec.quantize(model, policy, weight_rounding="awq")


def test_gptq_model_tracks_float_better_on_held_out_inputs() -> None:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    calibration, held_out = correlated_inputs(seed=3)[:400], correlated_inputs(seed=3)[400:]
    reference = float_model(held_out).detach()
    policy = Policy([("0", "w4g16"), ("2", "int8")])
    errors = {}
    for rounding in ("nearest", "gptq"):
        model = copy.deepcopy(float_model)
        report = mixprec.quantize(model, policy, calibration=[calibration], weight_rounding=rounding)
        assert {report.layer(n).weight_rounding for n in ("0", "2")} == {rounding}
        errors[rounding] = float(((model(held_out) - reference) ** 2).mean())
    assert errors["gptq"] < 0.7 * errors["nearest"]  # measured ratio 0.58


def test_gptq_refuses_a_hessian_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"hessian must be \[8, 8\], got \(4, 4\)"):
        gptq_quantize(torch.zeros(2, 8), torch.eye(4), CHANNEL)
