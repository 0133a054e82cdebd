"""Policies the search is compared with, under the same byte budget.

- :func:`weight_error_ranking` (NNCF-style mixed int4/int8): every layer starts at
  ``high``; layers are ranked by the relative weight quantization error at ``low``,
  ``||Q(W) - W||^2 / ||W||^2``, and the least damaged are moved to ``low`` one by one
  until the model fits the budget.
- :func:`random_choices`: a random policy that fits: every layer starts at its smallest
  option; then, in a random order, each layer takes a uniformly random option among
  those that still keep the model within the budget.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mixprec.analysis.search import SearchProblem
from mixprec.analysis.sensitivity import weight_perturbation
from mixprec.errors import PolicyError
from mixprec.precision import as_linear, parse_precision


def relative_weight_error(module: nn.Module, precision: str) -> float:
    """``||Q(W) - W||^2 / ||W||^2`` of one layer at ``precision`` (float64 sums)."""
    weight = as_linear(module).weight.detach().double()
    delta = weight_perturbation(module, parse_precision(precision)).double()
    return float(delta.pow(2).sum() / weight.pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny))


def weight_error_ranking(model: nn.Module, problem: SearchProblem, budget_bytes: int, low: str = "w4",
                         high: str = "int8") -> dict[str, str]:
    """Choices of the NNCF-style heuristic (see module docstring)."""
    for name in (low, high):
        if not any(o.precision == name for options in problem.layers.values() for o in options):
            raise PolicyError(f"{name!r} is not among the options (table candidates)")
    choices = {layer: high if any(o.precision == high for o in options) else "fp32"
               for layer, options in problem.layers.items()}
    movable = [layer for layer, options in problem.layers.items() if any(o.precision == low for o in options)]
    ranked = sorted(movable, key=lambda layer: relative_weight_error(model.get_submodule(layer), low))
    for layer in ranked:
        if problem.bytes_of(choices) <= budget_bytes:
            break
        choices[layer] = low
    if problem.bytes_of(choices) > budget_bytes:
        raise PolicyError(f"even with every layer that takes {low!r} at {low!r} the model holds "
                          f"{problem.bytes_of(choices)} bytes > budget {budget_bytes}")
    return choices


def random_choices(problem: SearchProblem, budget_bytes: int, rng: np.random.Generator) -> dict[str, str]:
    """One random policy within ``budget_bytes`` (see module docstring)."""
    choices = problem.extreme("bytes", largest=False)
    if problem.bytes_of(choices) > budget_bytes:
        raise PolicyError(f"the smallest model holds {problem.bytes_of(choices)} bytes > budget {budget_bytes}")
    layers = list(problem.layers)
    for index in rng.permutation(len(layers)):
        layer = layers[index]
        fitting = [o.precision for o in problem.layers[layer]
                   if problem.bytes_of({**choices, layer: o.precision}) <= budget_bytes]
        choices[layer] = fitting[int(rng.integers(len(fitting)))]
    return choices
