"""Choosing int8 or int16 activations per operator of a CNN chain (TFLite's 16x8 where int8 is too
coarse): by ordered rules over the layers' names (:func:`types_from_rules`), or under a memory
budget by measured sensitivity (:func:`choose_activation_types`).

Cost: :func:`arena_bytes`, the activation memory a chain of operators needs per sample: the
largest, over operators, of its input and output tensors' bytes together (a chain runs one
operator at a time and each tensor dies after its one reader, so this is the smallest arena
that holds it). Weights are int8 either way (biases int32 or int64: ignored), so the choice
moves activation memory only.

Sensitivity: each operator's gain is how much the output's mean squared error against the float
model (on validation inputs) falls when that operator alone takes int16 activations and all
others int8. :func:`choose_activation_types` upgrades operators to int16 in order of gain per
arena byte added, keeping each upgrade only when the whole graph's arena stays within the
budget (a multiple of the all-int8 arena) and its measured error falls with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.build.cnn import cnn_graph_from
from mixprec.integer.graph.graph import Graph

#: Layers that only fuse into the operator before them (or vanish); never a choice of their own.
_FUSED = (nn.ReLU, nn.ReLU6, nn.Flatten, nn.Identity)


def types_from_rules(names: Sequence[str], rules: Sequence[tuple[str, str]], default: str = "int8") -> list[str]:
    """One activation type per layer name for :func:`~mixprec.integer.build.cnn.cnn_graph_from`:
    the first rule whose regular expression matches the whole name decides (``re.fullmatch``),
    else ``default``. A rule that matches no name, or a type other than int8 / int16, is refused."""
    kinds = ("int8", "int16")
    if default not in kinds or any(kind not in kinds for _, kind in rules):
        raise InputError(f"activation types are {kinds}; got default {default!r} and rules {list(rules)}")
    compiled = []
    for pattern, kind in rules:
        try:
            compiled.append((re.compile(pattern), kind, pattern))
        except re.error as exc:
            raise InputError(f"rule {pattern!r} is not a regular expression: {exc}") from None
    types, used = [], set()
    for name in names:
        for expression, kind, pattern in compiled:
            if expression.fullmatch(name):
                types.append(kind)
                used.add(pattern)
                break
        else:
            types.append(default)
    unused = [pattern for _, _, pattern in compiled if pattern not in used]
    if unused:
        raise InputError(f"rules {unused} match none of the layer names; names look like {list(names)[:6]}")
    return types


def arena_bytes(graph: Graph) -> int:
    """Activation bytes per sample a chain needs (see module docstring)."""
    sizes = [int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
             for shape, dtype in zip(graph.tensor_shapes, graph.tensor_dtypes)]
    first = len(graph.inputs)
    return max(sum(sizes[i] for i in node.inputs) + sizes[first + k] for k, node in enumerate(graph.nodes))


def graph_input(graph: Graph, x: torch.Tensor) -> np.ndarray:
    """Float NCHW inputs onto the graph's NHWC input grid and type."""
    spec = graph.inputs[0]
    return spec.quant.nearest_codes(x.permute(0, 2, 3, 1).detach().numpy(), spec.dtype)


def output_error(graph: Graph, x: torch.Tensor, reference: np.ndarray) -> float:
    """Mean squared error of the graph's dequantized output against ``reference``."""
    return float(np.mean((graph.output_quant.values_of(graph(graph_input(graph, x))) - reference) ** 2))


@dataclass(frozen=True)
class ActivationMix:
    """A choice: one activation type per entry of the layer list, the graph it builds, its arena
    (bytes per sample) and output error, and the all-int8 arena it was budgeted against."""

    types: tuple[str, ...]
    graph: Graph
    arena: int
    error: float
    int8_arena: int


def choose_activation_types(layers: Sequence[nn.Module], calibration: torch.Tensor, validation: torch.Tensor,
                            budget: float = 1.3) -> ActivationMix:
    """The int8 / int16 mix for :func:`~mixprec.integer.build.cnn.cnn_graph_from` that the
    sensitivities rank first within ``budget`` times the all-int8 arena (see module docstring)."""
    if not isinstance(budget, (int, float)) or not budget >= 1.0:
        raise InputError(f"the budget is a multiple of the all-int8 activation arena, at least 1.0, got {budget!r}")
    if not isinstance(validation, torch.Tensor) or validation.dim() != 4 or not validation.is_floating_point():
        raise InputError("validation must be a float NCHW tensor of the model's inputs")
    with torch.no_grad():
        reference = nn.Sequential(*layers)(validation).numpy()

    def build(types: Sequence[str]) -> Graph:
        return cnn_graph_from(layers, calibration, activations=list(types))

    narrow = ["int8"] * len(layers)
    base = build(narrow)
    base_arena = arena_bytes(base)
    limit = budget * base_arena
    base_error = output_error(base, validation, reference)
    ranked = []
    for index, layer in enumerate(layers):
        if isinstance(layer, _FUSED):
            continue
        trial = list(narrow)
        trial[index] = "int16"
        graph = build(trial)
        added = max(arena_bytes(graph) - base_arena, 1)
        ranked.append(((base_error - output_error(graph, validation, reference)) / added, index))
    chosen, graph, error = list(narrow), base, base_error
    for gain, index in sorted(ranked, reverse=True):
        if gain <= 0:
            break
        trial = list(chosen)
        trial[index] = "int16"
        candidate = build(trial)
        if arena_bytes(candidate) <= limit:
            candidate_error = output_error(candidate, validation, reference)
            if candidate_error < error:  # together with the others chosen it must still help
                chosen, graph, error = trial, candidate, candidate_error
    return ActivationMix(tuple(chosen), graph, arena_bytes(graph), error, base_arena)
