"""The measured refinement of a searched policy (mixprec.analysis.refine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec import PolicyError
from mixprec.analysis import (
    SearchProblem,
    SensitivityTable,
    build_problem,
    refine,
    search,
    sensitivity,
    uniform_bytes,
)
from mixprec.analysis.sensitivity import mean_kl_divergence
from mixprec.errors import CalibrationError


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 8)).eval()


def _precision(module: nn.Module) -> str:
    precision = getattr(module, "precision", "fp32")
    return "w4" if precision.startswith("w4") else precision


def _setup() -> tuple[nn.Module, SensitivityTable, SearchProblem, torch.Tensor]:
    model = _model()
    data = torch.randn(64, 32)
    table = sensitivity(model, [data], ("int8", "w4"), progress=False)
    return model, table, build_problem(model, table), data


def test_refine_climbs_to_the_measured_optimum_within_the_budget() -> None:
    """A measure that wants layer 0 in float32 and the others in w4: reachable from the search's
    policy only through moves that free bytes first (or trade them between two layers); every step
    lowers the cost, the bytes stay within the budget, and the float model is left alone."""
    model, table, problem, _ = _setup()
    budget = uniform_bytes(model, "int8")
    start = search(model, table, budget_bytes=budget).choices
    wanted = {"0": "fp32", "2": "w4", "4": "w4"}
    assert start["0"] != "fp32" and problem.bytes_of({**start, "0": "fp32"}) > budget  # no single step gets there

    def measure(quantized: nn.Module) -> float:
        return float(sum(_precision(dict(quantized.named_modules())[name]) != p for name, p in wanted.items()))

    before = [p.detach().clone() for p in model.parameters()]
    result = refine(model, problem, start, budget, measure, max_evaluations=200)
    assert result.choices == wanted and result.cost == 0 and not result.exhausted
    assert result.start_cost == sum(start[name] != precision for name, precision in wanted.items())
    assert list(result.step_costs) == sorted(result.step_costs, reverse=True) and len(set(result.step_costs)) == len(
        result.step_costs)
    assert problem.bytes_of(result.choices) <= budget
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_refine_lowers_the_measured_kl_and_stops_at_the_evaluation_limit() -> None:
    model, table, problem, data = _setup()
    budget = (uniform_bytes(model, "int8") + uniform_bytes(model, "w4")) // 2
    start = search(model, table, budget_bytes=budget).choices
    with torch.no_grad():
        reference = model(data)

    def kl(quantized: nn.Module) -> float:
        with torch.no_grad():
            return mean_kl_divergence([reference], [quantized(data)])

    result = refine(model, problem, start, budget, kl, max_evaluations=40)
    assert result.cost <= result.start_cost and result.evaluations <= 40
    assert problem.bytes_of(result.choices) <= budget
    limited = refine(model, problem, start, budget, kl, max_evaluations=1)
    assert limited.evaluations == 1 and limited.exhausted and limited.choices == start


def test_refine_refuses_bad_input() -> None:
    model, _, problem, _ = _setup()
    budget = uniform_bytes(model, "int8")
    start = {"0": "int8", "2": "int8", "4": "int8"}
    with pytest.raises(PolicyError, match="missing \\['4'\\]"):
        refine(model, problem, {"0": "int8", "2": "int8"}, budget, lambda m: 0.0)
    with pytest.raises(PolicyError, match="has no option 'w2'"):
        refine(model, problem, {**start, "4": "w2"}, budget, lambda m: 0.0)
    with pytest.raises(PolicyError, match="over the budget"):
        refine(model, problem, start, budget - 1, lambda m: 0.0)
    with pytest.raises(PolicyError, match="max_evaluations must be an integer >= 1"):
        refine(model, problem, start, budget, lambda m: 0.0, max_evaluations=0)
    with pytest.raises(CalibrationError, match="must be finite"):
        refine(model, problem, start, budget, lambda m: float("nan"))
