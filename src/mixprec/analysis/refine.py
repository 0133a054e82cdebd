"""Measured refinement of a searched policy within its byte budget.

The search's program adds per-layer costs, each measured with one layer quantized and the
rest float; the errors of several quantized layers interact in the logits (they compound or
partly cancel), so the program's optimum need not be the most faithful policy of its budget.
:func:`refine` starts from a policy and climbs to neighbouring policies while a measured cost
falls: the cost of the whole quantized model, typically the KL divergence (nats) of its
logits from the float model's on calibration samples
(:func:`~mixprec.analysis.sensitivity.mean_kl_divergence`).

Neighbours of a policy, all within ``budget_bytes`` (whole-model bytes, as the search counts
them): one layer moved to another of its options; one layer moved to its next larger option
(by bytes) while another moves to its next smaller one (bytes traded between two layers).
They are tried in the order of the program's predicted change (the table's costs, smallest
first); the first that lowers the measured cost is taken, and the climb starts again from
there. It stops when a whole neighbourhood brings no improvement, or after
``max_evaluations`` measurements (the start's included).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations

import torch
from torch import nn

from mixprec.analysis.search import SearchProblem, policy_for
from mixprec.errors import CalibrationError, PolicyError
from mixprec.quantize import quantize

Measure = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Refinement:
    """The refined choices, their measured cost, the start's, every accepted step's cost (in order)
    and the number of policies measured."""

    choices: dict[str, str]
    cost: float
    start_cost: float
    step_costs: tuple[float, ...]
    evaluations: int
    exhausted: bool  # True: stopped by max_evaluations, not by a neighbourhood without improvement


def refine(model: nn.Module, problem: SearchProblem, choices: dict[str, str], budget_bytes: int, measure: Measure,
           max_evaluations: int = 60, calibration: Sequence[torch.Tensor] | None = None) -> Refinement:
    """Hill-climb from ``choices`` on the measured cost (see module docstring).

    Args:
        model: the float model the problem was built on (copied for each measurement, never changed).
        problem: the search problem (:func:`~mixprec.analysis.search.build_problem`): layers, options, bytes.
        choices: a precision for every layer of ``problem``, within ``budget_bytes``.
        measure: the cost of a quantized model (lower is better; a finite number).
        calibration: batches for options that calibrate (``int8-static``), else None.
    """
    _check(problem, choices, budget_bytes, max_evaluations)
    evaluations = 0

    def cost_of(candidate: dict[str, str]) -> float:
        nonlocal evaluations
        quantized = copy.deepcopy(model)
        quantize(quantized, policy_for(candidate), calibration=calibration)
        evaluations += 1
        value = float(measure(quantized))
        if not math.isfinite(value):
            raise CalibrationError(f"measure() returned {value} for the policy {candidate}; it must be finite")
        return value

    current = dict(choices)
    current_cost = start_cost = cost_of(current)
    steps: list[float] = []
    while True:
        for candidate in _neighbours(problem, current, budget_bytes):
            if evaluations >= max_evaluations:
                return Refinement(current, current_cost, start_cost, tuple(steps), evaluations, True)
            value = cost_of(candidate)
            if value < current_cost:
                current, current_cost = candidate, value
                steps.append(value)
                break
        else:  # a whole neighbourhood without improvement: a local optimum
            return Refinement(current, current_cost, start_cost, tuple(steps), evaluations, False)


def _check(problem: SearchProblem, choices: dict[str, str], budget_bytes: int, max_evaluations: int) -> None:
    if set(choices) != set(problem.layers):
        missing, extra = sorted(set(problem.layers) - set(choices)), sorted(set(choices) - set(problem.layers))
        raise PolicyError(f"choices must name every layer of the problem once: missing {missing}, unknown {extra}")
    for layer, precision in choices.items():
        if precision not in {o.precision for o in problem.layers[layer]}:
            raise PolicyError(f"layer {layer!r} has no option {precision!r}; options: "
                              f"{[o.precision for o in problem.layers[layer]]}")
    if not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise PolicyError(f"max_evaluations must be an integer >= 1, got {max_evaluations!r}")
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool):
        raise PolicyError(f"budget_bytes must be an integer, got {budget_bytes!r}")
    if problem.bytes_of(choices) > budget_bytes:
        raise PolicyError(f"the starting choices hold {problem.bytes_of(choices)} bytes, over the budget of "
                          f"{budget_bytes}: start from the search's result for that budget")


def _neighbours(problem: SearchProblem, choices: dict[str, str], budget_bytes: int) -> list[dict[str, str]]:
    """The neighbours within the budget (see module docstring), smallest predicted cost change first."""
    ordered = {layer: sorted(options, key=lambda o: (o.bytes, o.cost)) for layer, options in problem.layers.items()}
    position = {layer: [o.precision for o in ordered[layer]].index(choices[layer]) for layer in choices}
    moves: list[dict[str, str]] = []
    for layer, options in ordered.items():
        moves += [{**choices, layer: o.precision} for o in options if o.precision != choices[layer]]
    for grow, shrink in permutations(ordered, 2):
        up, down = position[grow] + 1, position[shrink] - 1
        if up < len(ordered[grow]) and down >= 0:
            moves.append({**choices, grow: ordered[grow][up].precision, shrink: ordered[shrink][down].precision})
    base = problem.cost_of(choices)
    unique = {tuple(sorted(m.items())): m for m in moves if problem.bytes_of(m) <= budget_bytes}
    return sorted(unique.values(), key=lambda m: problem.cost_of(m) - base)
