"""Searches checked by measurement: the accuracy-constrained search and the Pareto sweep.

``evaluate(model) -> float`` is the user's task score, higher is better (accuracy,
Spearman, negative loss, ...). Every policy is applied to a deep copy of the model with
:func:`mixprec.quantize`, so the model passed in is never changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from mixprec.analysis.latency import LatencyTable
from mixprec.analysis.search import SearchProblem, SearchResult, build_problem, policy_for, search
from mixprec.analysis.sensitivity import SensitivityTable
from mixprec.errors import CalibrationError, PolicyError
from mixprec.policy import Policy
from mixprec.quantize import quantize

Evaluate = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Measured:
    """A policy applied and evaluated: its score and the bytes the quantized model holds."""

    label: str
    policy: Policy
    choices: dict[str, str]
    score: float
    measured_bytes: int
    predicted_bytes: int
    predicted_latency_s: float | None
    budget: float | None = None


def measure_policy(model: nn.Module, label: str, choices: dict[str, str], problem: SearchProblem,
                   evaluate: Evaluate, budget: float | None = None) -> Measured:
    """Quantize a copy of ``model`` with ``choices`` and evaluate it."""
    policy = policy_for(choices)
    quantized = copy.deepcopy(model)
    report = quantize(quantized, policy)
    score = float(evaluate(quantized))
    if math.isnan(score):
        raise CalibrationError(f"evaluate() returned NaN for {label!r}")
    return Measured(label, policy, choices, score, report.total_bytes, problem.bytes_of(choices),
                    problem.seconds_of(choices), budget)


@dataclass(frozen=True)
class DropSearch:
    """The accuracy-constrained search: the chosen policy, the float score and every trial."""

    best: Measured
    reference_score: float
    max_drop: float
    trials: tuple[Measured, ...]


def search_max_drop(model: nn.Module, table: SensitivityTable, evaluate: Evaluate, max_drop: float,
                    objective: str = "bytes", latency: LatencyTable | None = None, steps: int = 8,
                    candidates: Sequence[str] | None = None, allow_fp32: bool = True) -> DropSearch:
    """The smallest (``objective="bytes"``) or fastest (``"latency"``) searched policy whose
    measured score is within ``max_drop`` of the float model's.

    Bisection over the budget between the smallest and the largest model the options give:
    at each budget the ILP's policy is applied and evaluated; a budget whose policy stays
    within the drop becomes the new upper end, otherwise the lower end. Scores need not be
    monotone in the budget, so the answer is the smallest passing policy actually measured
    (``steps`` + 2 evaluations at most, plus the float one).
    """
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise PolicyError(f"max_drop must be a finite number >= 0 (score points), got {max_drop!r}")
    if objective not in ("bytes", "latency"):
        raise PolicyError(f"objective must be 'bytes' or 'latency', got {objective!r}")
    if objective == "latency" and latency is None:
        raise PolicyError("objective='latency' needs latency=measure_latency(...)")
    if steps < 1:
        raise PolicyError(f"steps must be >= 1, got {steps}")
    problem = build_problem(model, table, latency, candidates, allow_fp32)
    key = "bytes" if objective == "bytes" else "seconds"
    low, high = problem.limits(key)
    reference = float(evaluate(model))
    trials: list[Measured] = []
    seen: dict[tuple[tuple[str, str], ...], Measured] = {}

    def trial(budget: float) -> Measured:
        kwargs = {"budget_bytes": int(budget)} if key == "bytes" else {"budget_latency_s": budget}
        result: SearchResult = search(model, table, latency=latency, candidates=candidates, allow_fp32=allow_fp32,
                                      **kwargs)  # type: ignore[arg-type]
        signature = tuple(result.choices.items())
        if signature not in seen:
            seen[signature] = measure_policy(model, f"searched, {key} budget {budget:.6g}", result.choices,
                                             problem, evaluate, budget)
            trials.append(seen[signature])
        return seen[signature]

    def passes(measured: Measured) -> bool:
        return reference - measured.score <= max_drop

    top = trial(high)
    if not passes(top):
        raise PolicyError(f"even the most accurate policy these options give drops {reference - top.score:.4g} "
                          f"(> max_drop {max_drop}); allow fp32 or add a more accurate candidate")
    best, fail_budget, pass_budget = top, low, high
    bottom = trial(low)
    if passes(bottom):
        best = bottom
    else:
        for _ in range(steps):
            middle = (fail_budget + pass_budget) / 2
            measured = trial(middle)
            if passes(measured):
                pass_budget = middle
                if _size(measured, key) < _size(best, key):
                    best = measured
            else:
                fail_budget = middle
    return DropSearch(best, reference, float(max_drop), tuple(trials))


def _size(measured: Measured, key: str) -> float:
    return measured.predicted_bytes if key == "bytes" else (measured.predicted_latency_s or 0.0)


def uniform_choices(problem: SearchProblem, precision: str) -> dict[str, str]:
    """Every layer at ``precision`` where it is an option, float32 elsewhere."""
    return {layer: precision if any(o.precision == precision for o in options) else "fp32"
            for layer, options in problem.layers.items()}


def pareto_sweep(model: nn.Module, table: SensitivityTable, evaluate: Evaluate, budgets: Sequence[int],
                 latency: LatencyTable | None = None, uniform: Sequence[str] = (),
                 candidates: Sequence[str] | None = None) -> list[Measured]:
    """Score against bytes: the searched policy at each byte budget, then each uniform
    precision in ``uniform`` (labelled ``uniform <name>``), all measured."""
    if not budgets:
        raise PolicyError("pareto_sweep needs at least one byte budget")
    problem = build_problem(model, table, latency, candidates)
    points = []
    for budget in budgets:
        result = search(model, table, budget_bytes=budget, latency=latency, candidates=candidates)
        points.append(measure_policy(model, f"searched, {budget} B", result.choices, problem, evaluate, budget))
    for precision in uniform:
        points.append(measure_policy(model, f"uniform {precision}", uniform_choices(problem, precision), problem,
                                     evaluate))
    return points
