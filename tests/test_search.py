"""The precision search: exact ILP optimum, honest byte predictions, budgets checked, measured modes."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixprec import PolicyError, quantize
from mixprec.analysis import (
    build_problem,
    measure_latency,
    pareto_sweep,
    random_choices,
    relative_weight_error,
    search,
    search_max_drop,
    sensitivity,
    uniform_bytes,
    weight_error_ranking,
)
from mixprec.policy import Policy

CANDIDATES = ["int8", "w4", "bf16"]


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(32, 64, generator=generator) for _ in range(2)]


@pytest.fixture(scope="module")
def table():  # noqa: ANN201
    return sensitivity(model(), data(), CANDIDATES, progress=False)


def brute_force(net: nn.Module, table, budget: int) -> float:  # noqa: ANN001
    problem = build_problem(net, table)
    best = math.inf
    for combo in itertools.product(*problem.layers.values()):
        choices = {layer: o.precision for layer, o in zip(problem.layers, combo)}
        if problem.bytes_of(choices) <= budget:
            best = min(best, problem.cost_of(choices))
    return best


def test_the_ilp_finds_the_brute_force_optimum_and_predicts_exact_bytes(table) -> None:  # noqa: ANN001
    net = model()
    problem = build_problem(net, table)
    low, high = problem.limits("bytes")
    for budget in np.linspace(low, high, 9).astype(int):
        result = search(net, table, budget_bytes=int(budget))
        assert result.predicted_bytes <= budget
        assert result.predicted_cost == pytest.approx(brute_force(net, table, int(budget)), rel=1e-9, abs=1e-15)
        report = quantize(model(), result.policy)
        assert report.total_bytes == result.predicted_bytes
        assert set(result.choices) == {"0", "2", "4", "6"}
    assert search(net, table, budget_bytes=high).choices == dict.fromkeys("0246", "fp32")


def test_the_result_is_an_ordinary_policy_naming_every_layer(table, tmp_path: Path) -> None:  # noqa: ANN001
    result = search(model(), table, budget_bytes=40_000)
    path = tmp_path / "searched.toml"
    path.write_text(result.to_toml())
    assert "# mixprec search: predicted bytes" in path.read_text()
    policy = Policy.from_toml(path)
    assert policy == result.policy
    assert {plan.name: plan.precision.name for plan in policy.plan(model())} == result.choices


def test_a_latency_budget_is_met_by_prediction_and_is_optimal(table) -> None:  # noqa: ANN001
    net = model()
    modules = list(net.modules())
    latency = measure_latency(net, data()[0], CANDIDATES, rounds=3, min_seconds=0.01, progress=False)
    assert list(net.modules()) == modules  # every layer put back
    assert {(r.layer, r.precision) for r in latency.rows} == {(n, p) for n in "0246" for p in ["fp32", *CANDIDATES]}
    assert all(r.seconds > 0 for r in latency.rows) and latency.model_fp32_s > 0
    assert latency.predict({"0": "int8"}) == pytest.approx(
        latency.predict({}) - latency.seconds("0", "fp32") + latency.seconds("0", "int8"))
    problem = build_problem(net, table, latency)
    fastest = problem.seconds_of(problem.extreme("seconds", False))
    slowest = problem.seconds_of(problem.extreme("seconds", True))
    budget = (fastest + slowest) / 2
    result = search(net, table, budget_latency_s=budget, latency=latency)
    assert result.predicted_latency_s <= budget
    best = min(problem.cost_of(dict(zip(problem.layers, (o.precision for o in combo))))
               for combo in itertools.product(*problem.layers.values())
               if problem.seconds_of(dict(zip(problem.layers, (o.precision for o in combo))))
               <= budget)
    assert result.predicted_cost == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_budgets_and_tables_are_checked(table) -> None:  # noqa: ANN001
    net = model()
    problem = build_problem(net, table)
    low, high = problem.limits("bytes")
    with pytest.raises(PolicyError, match=rf"below the smallest model these candidates give \({low} bytes"):
        search(net, table, budget_bytes=low - 1)
    with pytest.raises(PolicyError, match=rf"above the largest model these candidates give \({high} bytes"):
        search(net, table, budget_bytes=high + 1)
    with pytest.raises(PolicyError, match="needs a budget"):
        search(net, table)
    with pytest.raises(PolicyError, match="latency budget needs per-layer latencies"):
        search(net, table, budget_latency_s=1e-3)
    with pytest.raises(PolicyError, match="must be a finite number"):
        search(net, table, budget_bytes=float("nan"))
    with pytest.raises(PolicyError, match="was it measured on another model"):
        search(nn.Sequential(nn.Linear(64, 10)), table, budget_bytes=low)
    with pytest.raises(PolicyError, match=r"candidates \['w8'\] have no measurements"):
        search(net, table, budget_bytes=high, candidates=["int8", "w8"])
    with pytest.raises(PolicyError, match="non-empty SensitivityTable"):
        search(net, [], budget_bytes=high)


def output_error(reference: nn.Module):  # noqa: ANN201
    batch = data()[1]
    with torch.no_grad():
        expected = reference(batch)

    def score(net: nn.Module) -> float:
        with torch.no_grad():
            return -100.0 * float((net(batch) - expected).pow(2).mean() / expected.pow(2).mean())
    return score


def test_max_drop_search_returns_the_smallest_measured_policy_within_the_drop(table) -> None:  # noqa: ANN001
    net = model()
    evaluate = output_error(net)
    result = search_max_drop(net, table, evaluate, max_drop=0.05)
    assert result.reference_score == 0.0
    assert result.reference_score - result.best.score <= 0.05
    passing = [t for t in result.trials if result.reference_score - t.score <= 0.05]
    assert result.best.predicted_bytes == min(t.predicted_bytes for t in passing)
    assert any(result.reference_score - t.score > 0.05 for t in result.trials)  # the bound did bind
    assert all(t.measured_bytes == t.predicted_bytes for t in result.trials)
    with pytest.raises(PolicyError, match="max_drop must be a finite number >= 0"):
        search_max_drop(net, table, evaluate, max_drop=-1)
    with pytest.raises(PolicyError, match="even the most accurate policy"):
        search_max_drop(net, table, evaluate, max_drop=0.0, candidates=["w4"], allow_fp32=False)


def test_pareto_sweep_and_baselines(table) -> None:  # noqa: ANN001
    net = model()
    problem = build_problem(net, table)
    low, high = problem.limits("bytes")
    points = pareto_sweep(net, table, output_error(net), [low, (low + high) // 2, high], uniform=["int8", "w4"])
    assert [p.label for p in points][-2:] == ["uniform int8", "uniform w4"]
    assert points[0].score <= points[1].score <= points[2].score == 0.0
    budget = (low + problem.bytes_of(dict.fromkeys("0246", "int8"))) // 2
    nncf = weight_error_ranking(net, build_problem(net, table, candidates=["int8", "w4"], allow_fp32=False), budget)
    assert problem.bytes_of(nncf) <= budget and set(nncf.values()) == {"int8", "w4"}
    errors = {layer: relative_weight_error(net.get_submodule(layer), "w4") for layer in nncf}
    moved = [errors[k] for k, v in nncf.items() if v == "w4"]
    assert max(moved) <= min(errors[k] for k, v in nncf.items() if v == "int8")
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert problem.bytes_of(random_choices(problem, budget, rng)) <= budget
    assert search(net, table, budget_bytes=budget).predicted_cost <= problem.cost_of(nncf)


def test_uniform_bytes_is_what_quantize_gives() -> None:
    for precision in ("int8", "w4", "bf16", "fp32"):
        assert uniform_bytes(model(), precision) == quantize(model(), Policy(default=precision)).total_bytes


def test_latency_refuses_layers_that_do_not_run() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(64, 8), nn.Linear(64, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    from mixprec import CalibrationError

    with pytest.raises(CalibrationError, match=r"layers \['unused'\] did not run on the batch"):
        measure_latency(Branchy(), data()[0], ["int8"], rounds=1, min_seconds=0.001, progress=False)
    with pytest.raises(PolicyError, match="are not quantizable layers"):
        measure_latency(model(), data()[0], ["int8"], layers=["1"], progress=False)


def test_latency_is_timed_with_the_garbage_collector_paused() -> None:
    import gc

    seen: list[bool] = []
    net = model()
    net[0].register_forward_hook(lambda *_: seen.append(gc.isenabled()))
    measure_latency(net, data()[0], ["int8"], rounds=2, min_seconds=0.0, progress=False)
    assert len(seen) > 4 and not any(seen)
    assert gc.isenabled()


def test_helpers_refuse_bad_input(table) -> None:  # noqa: ANN001
    from mixprec import CalibrationError

    net = model()
    problem = build_problem(net, table)
    low, _ = problem.limits("bytes")
    with pytest.raises(PolicyError, match="at least one byte budget"):
        pareto_sweep(net, table, output_error(net), [])
    with pytest.raises(PolicyError, match=rf"the smallest model holds {low} bytes > budget {low - 1}"):
        random_choices(problem, low - 1, np.random.default_rng(0))
    with pytest.raises(PolicyError, match="'w8' is not among the options"):
        weight_error_ranking(net, problem, low, low="w8")
    with pytest.raises(PolicyError, match="objective='latency' needs latency="):
        search_max_drop(net, table, output_error(net), 0.1, objective="latency")
    with pytest.raises(PolicyError, match="objective must be 'bytes' or 'latency'"):
        search_max_drop(net, table, output_error(net), 0.1, objective="speed")
    with pytest.raises(CalibrationError, match="rounds must be >= 1"):
        measure_latency(net, data()[0], ["int8"], rounds=0)
    with pytest.raises(PolicyError, match=r"\['int8-static'\] need calibrated activations"):
        measure_latency(net, data()[0], ["int8-static"])
    with pytest.raises(PolicyError, match="needs a list of candidate precisions"):
        measure_latency(net, data()[0], [])
