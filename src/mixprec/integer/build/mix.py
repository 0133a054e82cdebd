"""Choosing int8 or int16 activations per operator (TFLite's 16x8 where int8 is too coarse): for a
CNN chain by ordered rules over the layers' names (:func:`types_from_rules`) or by measured
sensitivity under a memory budget or a measured-latency budget (:func:`choose_activation_types`);
for any graph builder that takes a set of choices to widen, by the same search
(:func:`choose_wide`, any cost).

Cost: :func:`arena_bytes`, the activation memory a graph needs per sample when its operators run
in order and each tensor is freed after its last reader: the largest, over operators, of the
bytes alive while it runs (its inputs, its output, and every earlier tensor still to be read).
For a chain that is the largest input-plus-output pair. Weights are int8 either way (biases
int32 or int64: ignored), so the choice moves activation memory only.

Sensitivity: each choice's gain is how much the output's error against the float model (on
validation inputs) falls when that choice alone is int16 and everything else int8.
:func:`choose_wide` widens choices in order of gain per arena byte added, keeping each only
when the whole graph's arena stays within the budget (a multiple of the all-int8 arena) and its
measured error falls with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.build.cnn import cnn_graph_from
from mixprec.integer.core.profile import median_seconds
from mixprec.integer.graph.graph import Graph
from mixprec.kernels import native

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
    """Activation bytes per sample the graph needs (see module docstring)."""
    sizes = [int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
             for shape, dtype in zip(graph.tensor_shapes, graph.tensor_dtypes)]
    first = len(graph.inputs)
    last_read = {tensor: first + k for k, node in enumerate(graph.nodes) for tensor in node.inputs}
    peak = 0
    for step in range(first, first + len(graph.nodes)):  # the tensor the step's node writes
        alive = [t for t in range(step) if last_read.get(t, -1) >= step]
        peak = max(peak, sum(sizes[t] for t in alive) + sizes[step])
    return peak


def graph_input(graph: Graph, x: torch.Tensor) -> np.ndarray:
    """Float NCHW inputs onto the graph's NHWC input grid and type (:meth:`Quantization.nearest_codes`; by
    the native kernel for float32 input when it is built)."""
    spec = graph.inputs[0]
    if (native.available() and spec.dtype in ("int8", "int16") and x.dtype == torch.float32 and x.dim() == 4
            and len(spec.quant.scale) == 1):
        codes = native.tflite_quantize_nchw(x.detach().contiguous(), float(np.float32(spec.quant.scale[0])),
                                            int(spec.quant.zero_point[0]), spec.dtype == "int16")
        return codes.numpy()
    return spec.quant.nearest_codes(x.permute(0, 2, 3, 1).detach().numpy(), spec.dtype)


def run_float(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """Float NCHW inputs -> the graph's output dequantized to float32: :func:`graph_input`, the graph and
    ``output_quant.values_of`` rounded to float32, in one native call where the graph has one
    (:attr:`Graph.native_float_program`; the same values)."""
    program = graph.native_float_program
    if (program is not None and isinstance(x, torch.Tensor) and x.dtype == torch.float32
            and x.shape[1:] == program.float_image):  # checked first: the common call, at batch 1 a few us
        return program((x.detach() if x.requires_grad else x).contiguous())
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"run_float takes a float NCHW tensor, got {getattr(x, 'shape', type(x).__name__)}")
    spec = graph.inputs[0]
    if len(graph.inputs) != 1 or len(spec.shape) != 4:
        raise InputError(f"run_float runs graphs of one NHWC image input; this one takes "
                         f"{[tuple(s.shape) for s in graph.inputs]}")
    if tuple(x.shape[1:]) != (spec.shape[3], spec.shape[1], spec.shape[2]):
        raise InputError(f"the graph takes NCHW images of {(spec.shape[3], spec.shape[1], spec.shape[2])} (C, H, W), "
                         f"got {tuple(x.shape[1:])}")
    codes = graph(graph_input(graph, x))
    return torch.from_numpy(graph.output_quant.values_of(codes).astype(np.float32))


def output_error(graph: Graph, x: torch.Tensor, reference: np.ndarray) -> float:
    """Mean squared error of the graph's dequantized output against ``reference``."""
    return float(np.mean((graph.output_quant.values_of(graph(graph_input(graph, x))) - reference) ** 2))


@dataclass(frozen=True)
class WideChoice:
    """What :func:`choose_wide` picked: the choices made int16 (in the order taken), the graph
    they build, its arena (bytes per sample) and output error, and the all-int8 arena."""

    wide: tuple[Hashable, ...]
    graph: Any
    arena: float
    error: float
    int8_arena: float


def choose_wide(choices: Sequence[Hashable], build: Callable[[frozenset], Any], error: Callable[[Any], float],
                budget: float = 1.3, cost: Callable[[Any], float] = arena_bytes) -> WideChoice:
    """The set of ``choices`` to make int16 that the sensitivities rank first within ``budget``
    times the all-int8 arena (see module docstring). ``build(wide)`` gives the graph (or
    anything ``cost`` measures, e.g. a half-precision pipeline and its
    :meth:`~mixprec.integer.half.pipeline.Pipeline.arena_bytes`) with the choices in ``wide``
    int16 and the rest int8; ``error(graph)`` its output error."""
    if not isinstance(budget, (int, float)) or not budget >= 1.0:
        raise InputError(f"the budget is a multiple of the all-int8 activation arena, at least 1.0, got {budget!r}")
    if len(set(choices)) != len(choices) or not choices:
        raise InputError(f"choices must be distinct and at least one, got {list(choices)}")
    base = build(frozenset())
    base_arena = cost(base)
    base_error = error(base)
    # the smallest cost step, so a free choice divides by something: a byte for integer costs (the
    # arena), a thousandth of the all-int8 cost for measured ones (seconds)
    unit = 1 if isinstance(base_arena, (int, np.integer)) else 1e-3 * base_arena
    ranked = []
    for order, choice in enumerate(choices):
        graph = build(frozenset([choice]))
        added = max(cost(graph) - base_arena, unit)
        ranked.append(((base_error - error(graph)) / added, order, choice))  # ties: the later choice first
    wide: list[Hashable] = []
    graph, best, spent = base, base_error, base_arena
    for gain, _, choice in sorted(ranked, key=lambda item: item[:2], reverse=True):
        if gain <= 0:
            break
        candidate = build(frozenset([*wide, choice]))
        candidate_cost = cost(candidate)
        if candidate_cost <= budget * base_arena:
            candidate_error = error(candidate)
            if candidate_error < best:  # together with the others chosen it must still help
                wide, graph, best, spent = [*wide, choice], candidate, candidate_error, candidate_cost
    return WideChoice(tuple(wide), graph, spent, best, base_arena)


def graph_seconds(inputs: torch.Tensor, repeats: int = 9) -> Callable[[Graph], float]:
    """A latency cost for :func:`choose_wide`: a CNN graph's median seconds per call on the float
    NCHW ``inputs`` (put on each graph's own input grid and type first; ``repeats`` timed calls
    after one warm-up)."""
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")

    def seconds(graph: Graph) -> float:
        codes = graph_input(graph, inputs)
        graph(codes)
        return median_seconds([(graph, (0,))], [codes], repeats)[0]

    return seconds


@dataclass(frozen=True)
class ActivationMix:
    """A choice: one activation type per entry of the layer list, the graph it builds, its arena
    (bytes per sample) and output error, and the all-int8 arena it was budgeted against; with a
    latency budget also the measured seconds per call of the mix and of the all-int8 graph."""

    types: tuple[str, ...]
    graph: Graph
    arena: int
    error: float
    int8_arena: int
    seconds: float | None = None
    int8_seconds: float | None = None


def choose_activation_types(layers: Sequence[nn.Module], calibration: torch.Tensor, validation: torch.Tensor,
                            budget: float = 1.3, latency_inputs: torch.Tensor | None = None) -> ActivationMix:
    """The int8 / int16 mix for :func:`~mixprec.integer.build.cnn.cnn_graph_from` that the
    sensitivities rank first within ``budget`` times the all-int8 arena, or, given
    ``latency_inputs`` (float NCHW), within ``budget`` times the all-int8 graph's measured time
    on them (:func:`choose_wide` over the layers that are operators of their own)."""
    if not isinstance(validation, torch.Tensor) or validation.dim() != 4 or not validation.is_floating_point():
        raise InputError("validation must be a float NCHW tensor of the model's inputs")
    if latency_inputs is not None and (not isinstance(latency_inputs, torch.Tensor) or latency_inputs.dim() != 4
                                       or not latency_inputs.is_floating_point()):
        raise InputError("latency_inputs must be a float NCHW tensor of the model's inputs")
    with torch.no_grad():
        reference = nn.Sequential(*layers)(validation).numpy()

    def types_of(wide: frozenset) -> list[str]:
        return ["int16" if index in wide else "int8" for index in range(len(layers))]

    cost = arena_bytes if latency_inputs is None else graph_seconds(latency_inputs)
    choice = choose_wide([index for index, layer in enumerate(layers) if not isinstance(layer, _FUSED)],
                         lambda wide: cnn_graph_from(layers, calibration, activations=types_of(wide)),
                         lambda graph: output_error(graph, validation, reference), budget, cost)
    types = tuple(types_of(frozenset(choice.wide)))
    if latency_inputs is None:
        return ActivationMix(types, choice.graph, int(choice.arena), choice.error, int(choice.int8_arena))
    int8_arena = arena_bytes(cnn_graph_from(layers, calibration, activations=types_of(frozenset())))
    return ActivationMix(types, choice.graph, arena_bytes(choice.graph), choice.error, int8_arena, choice.arena,
                         choice.int8_arena)
