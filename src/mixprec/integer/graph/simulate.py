"""Exact-arithmetic simulation of an integer graph: the quantized model without the engine.

Every int8 or int16 tensor is computed from the dequantized inputs of its operator in float64
with the operator's mathematical definition (no fixed-point multipliers, no lookup tables, no
intermediate roundings) and then rounded once onto its own grid in its own type (nearest, ties
to even, saturating). Weights, biases and grids are the graph's own. The difference between a graph's
output and :func:`simulate` is therefore the engine's arithmetic error alone; the difference
between :func:`simulate` and a float model is the quantization error alone.

:func:`rounding_attribution` splits that quantization error further: the graph simulated
with one tensor rounded at a time (every other tensor kept real, weights still int8), each
against a float reference, says which tensor's grid costs the most.

``activation_bits=16`` asks what TFLite's 16x8 mode (int16 activations, int8 weights) would
give an int8 graph before anyone builds it: every int8 activation grid is replaced by the
symmetric int16 grid covering the same real range (see :func:`onto_grid`); int16 tensors keep
their grids.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.tensors import Quantization
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import (
    AddConstantNode,
    AddNode,
    DequantizeNode,
    EmbeddingNode,
    FullyConnectedNode,
    LayerNormNode,
    LinearAttentionNode,
    LogisticNode,
    MeanNode,
    MulNode,
    QuantizeNode,
    ReshapeNode,
    SoftmaxAttentionNode,
    SoftmaxNode,
    TanhNode,
)
from mixprec.integer.ops.softmax16 import SOFTMAX16_OUTPUT

#: Activation widths :func:`simulate` can round onto.
ACTIVATION_BITS = (8, 16)


def onto_grid(values: NDArray[np.float64], quant: Quantization, bits: int = 8,
              dtype: str = "int8") -> NDArray[np.float64]:
    """``values`` rounded onto ``quant``'s grid in ``dtype`` (int8 or int16; nearest, ties to
    even, saturating), as reals.

    ``bits=16`` with an int8 grid: onto the int16 grid TFLite's 16x8 mode would give the same tensor instead:
    zero point 0, ``scale = float32(max(|low|, |high|) / 32767)`` where ``[low, high]`` is the
    real range of ``quant``'s int8 grid, codes ``clamp(round_half_even(x / scale), -32768, 32767)``."""
    if bits == 8 or dtype == "int16":
        return quant.values_of(quant.nearest_codes(values, dtype))
    if bits != 16:
        raise InputError(f"activation bits must be one of {ACTIVATION_BITS}, got {bits!r}")
    low, high = quant.values_of(np.array([-128, 127]))
    scale = float(np.float32(max(abs(low), abs(high)) / 32767))
    with np.errstate(over="ignore", invalid="ignore"):
        steps = np.round(np.asarray(values, dtype=np.float64) / scale)
    return np.clip(steps, -32768, 32767) * scale


def _activation(values: NDArray[np.float64], activation: str) -> NDArray[np.float64]:
    if activation == "relu":
        return np.maximum(values, 0)
    if activation == "relu6":
        return np.clip(values, 0, 6)
    return values


def _softmax(scores: NDArray[np.float64]) -> NDArray[np.float64]:
    exps = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exps / exps.sum(axis=-1, keepdims=True)


def _fully_connected(node: FullyConnectedNode, x: NDArray[np.float64], in_quant: Quantization) -> NDArray[np.float64]:
    scales = node.weight_quant.scale32.astype(np.float64)
    weight = node.weights.astype(np.float64) * (scales[:, None] if len(scales) > 1 else scales[0])
    bias = 0.0 if node.bias is None else node.bias * (float(in_quant.scale32[0]) * scales)
    return _activation(x @ weight.T + bias, node.activation)


def _layer_norm(node: LayerNormNode, x: NDArray[np.float64]) -> NDArray[np.float64]:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred**2).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(variance + node.epsilon) * node.gamma.astype(np.float64) + node.beta.astype(np.float64)


def linear_attention_exact(q: NDArray, k: NDArray, v: NDArray, epsilon: float) -> NDArray[np.float64]:
    """ReLU-feature linear attention, exact: ``relu(q) (relu(k)^T v) / (relu(q) . sum_t relu(k) + epsilon)``."""
    q, k = np.maximum(q, 0), np.maximum(k, 0)
    normalizer = (q * k.sum(axis=-2, keepdims=True)).sum(axis=-1, keepdims=True) + epsilon
    return (q @ (np.swapaxes(k, -1, -2) @ v)) / normalizer


def _attention(node, q: NDArray, k: NDArray, v: NDArray, inner: bool, bits: int,  # noqa: ANN001
               dtype: str) -> NDArray[np.float64]:
    if isinstance(node, SoftmaxAttentionNode):
        scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
        if inner:
            scores = onto_grid(scores, node.score_quant, bits, dtype)
        probabilities = _softmax(scores)
        if inner:
            grid = Quantization.per_tensor(*SOFTMAX16_OUTPUT) if dtype == "int16" else Quantization.per_tensor(1 / 256,
                                                                                                            -128)
            probabilities = onto_grid(probabilities, grid, bits, dtype)
        return probabilities @ v
    return linear_attention_exact(q, k, v, node.epsilon)


def exact_operator(node, args: list[NDArray], in_quants: list[Quantization | None],  # noqa: ANN001
                   inner: bool = True, bits: int = 8, dtype: str = "int8") -> NDArray:
    """The operator's mathematical result on real-valued inputs (before rounding onto its grid).
    ``inner``: whether the operator's own intermediate grids round (softmax attention's scores
    and probabilities: 1/256 for int8, 1/32768 for int16), onto ``bits``-wide grids in the
    operator's type ``dtype`` (:func:`onto_grid`)."""
    if isinstance(node, FullyConnectedNode):
        return _fully_connected(node, args[0], in_quants[0])
    if isinstance(node, AddNode):
        return _activation(args[0] + args[1], node.activation)
    if isinstance(node, MulNode):
        return _activation(args[0] * args[1], node.activation)
    if isinstance(node, AddConstantNode):
        return args[0] + node.constant_quant.values_of(node.constant)
    if isinstance(node, EmbeddingNode):
        return node.table_quant.values_of(node.table)[args[0]]
    if isinstance(node, LayerNormNode):
        return _layer_norm(node, args[0])
    if isinstance(node, (SoftmaxAttentionNode, LinearAttentionNode)):
        return _attention(node, *args, inner, bits, dtype)
    if isinstance(node, MeanNode):
        return args[0].mean(axis=tuple(node.axes), keepdims=node.keep_dims)
    if isinstance(node, ReshapeNode):
        return args[0].reshape(args[0].shape[0], *node.shape)
    if isinstance(node, SoftmaxNode):
        return _softmax(node.beta * args[0])
    if isinstance(node, TanhNode):
        return np.tanh(args[0])
    if isinstance(node, LogisticNode):
        return 1 / (1 + np.exp(-args[0]))
    if isinstance(node, (QuantizeNode, DequantizeNode)):
        return args[0].astype(np.float64)
    raise InputError(f"simulate does not know operator {node.opcode}")


def _check(graph: Graph, inputs: tuple[NDArray, ...]) -> None:
    if not isinstance(graph, Graph):
        raise InputError(f"simulate takes a mixprec.integer.Graph, got {type(graph).__name__}")
    if len(inputs) != len(graph.inputs):
        raise InputError(f"the graph takes {len(graph.inputs)} inputs, got {len(inputs)}")


def _as_real(value: NDArray, quant: Quantization | None) -> NDArray:
    return quant.values_of(value) if quant is not None and value.dtype in (np.int8, np.int16) else np.asarray(value)


def simulate(graph: Graph, *inputs: NDArray, rounded: Collection[int] | None = None,
             activation_bits: int = 8) -> NDArray[np.float64]:
    """The real values of ``graph``'s output for ``inputs`` (see module docstring).

    ``rounded``: the graph tensors (numbered as in the graph: inputs first, then one per
    node) that round onto their grids, with their operators' intermediate grids; the others
    keep their exact real values. Default: every tensor, which is the quantized model.
    ``activation_bits``: 8 (the graph's own grids) or 16 (each grid's int16 counterpart,
    :func:`onto_grid`); the graph's inputs stay as given, the weights stay int8.
    """
    _check(graph, inputs)
    if activation_bits not in ACTIVATION_BITS:
        raise InputError(f"activation_bits must be one of {ACTIVATION_BITS}, got {activation_bits!r}")
    quants, dtypes = graph.tensor_quants, graph.tensor_dtypes
    if rounded is not None:
        strays = sorted(set(rounded) - set(range(len(quants))))
        if strays:
            raise InputError(f"rounded names tensors {strays[:3]} this graph does not have (0..{len(quants) - 1})")
    values = [_as_real(x, spec.quant) for x, spec in zip(inputs, graph.inputs)]
    for index, node in enumerate(graph.nodes):
        tensor = len(graph.inputs) + index
        rounds = rounded is None or tensor in rounded
        result = exact_operator(node, [values[i] for i in node.inputs], [quants[i] for i in node.inputs], rounds,
                                activation_bits, dtypes[tensor])
        rounds = rounds and quants[tensor] is not None
        values.append(onto_grid(result, quants[tensor], activation_bits, dtypes[tensor]) if rounds else result)
    return values[-1]


def rounding_attribution(graph: Graph, *inputs: NDArray, reference: NDArray) -> list[tuple[str, float]]:
    """Which tensor's grid costs the most: the worst absolute error against ``reference`` (the
    float model's output for ``inputs``, in real units) of the graph simulated with no tensor
    rounded (``"weights only"``: the int8 weights alone), then with each rounded tensor alone
    (``"index:OPCODE"`` of the node that makes it), largest first after the first entry.
    Errors do not add up: roundings interact, and the worst case of each is over all outputs."""
    expected = np.asarray(reference, dtype=np.float64)
    weights_only = simulate(graph, *inputs, rounded=())
    if expected.shape != weights_only.shape:
        raise InputError(f"reference has shape {expected.shape}; the graph's output has {weights_only.shape}")
    quants, first = graph.tensor_quants, len(graph.inputs)
    alone = [(f"{index}:{node.opcode}", float(np.abs(simulate(graph, *inputs, rounded={first + index})
                                                    - expected).max()))
             for index, node in enumerate(graph.nodes) if quants[first + index] is not None]
    return [("weights only", float(np.abs(weights_only - expected).max())),
            *sorted(alone, key=lambda item: -item[1])]


def operator_errors(graph: Graph, *inputs: NDArray) -> list[tuple[str, float]]:
    """Per operator: the worst distance, in output steps, between the engine's output and
    the exact result rounded onto the same grid, both computed from the engine's own inputs.
    This is each operator's arithmetic error, without what earlier operators passed on."""
    _check(graph, inputs)
    graph(*inputs)  # validates the inputs
    quants, dtypes = graph.tensor_quants, graph.tensor_dtypes
    values = list(inputs)
    errors = []
    for index, (node, record) in enumerate(zip(graph.nodes, graph.records)):
        args = [values[i] for i in node.inputs]
        out = node.run(record, *args)
        out_quant, dtype = quants[len(graph.inputs) + index], dtypes[len(graph.inputs) + index]
        if out_quant is not None:
            in_real = [_as_real(a, quants[i]) for a, i in zip(args, node.inputs)]
            exact = onto_grid(exact_operator(node, in_real, [quants[i] for i in node.inputs], dtype=dtype), out_quant,
                              dtype=dtype)
            worst = np.abs(out_quant.values_of(out) - exact).max(initial=0.0) / float(out_quant.scale32[0])
            errors.append((f"{index}:{node.opcode}", float(worst)))
        values.append(out)
    return errors
