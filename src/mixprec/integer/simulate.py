"""Exact-arithmetic simulation of an integer graph: the quantized model without the engine.

Every int8 tensor is computed from the dequantized inputs of its operator in float64 with
the operator's mathematical definition (no fixed-point multipliers, no lookup tables, no
intermediate roundings) and then rounded once onto its own grid (nearest, ties to even,
saturating). Weights, biases and grids are the graph's own. The difference between a graph's
output and :func:`simulate` is therefore the engine's arithmetic error alone; the difference
between :func:`simulate` and a float model is the quantization error alone.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.graph import Graph
from mixprec.integer.nodes import (
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
from mixprec.integer.tensors import Quantization


def onto_grid(values: NDArray[np.float64], quant: Quantization) -> NDArray[np.float64]:
    """``values`` rounded onto ``quant``'s int8 grid (nearest, ties to even, saturating), as reals."""
    return quant.values_of(quant.nearest_codes(values))


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


def _attention(node, q: NDArray, k: NDArray, v: NDArray) -> NDArray[np.float64]:  # noqa: ANN001
    if isinstance(node, SoftmaxAttentionNode):
        scores = onto_grid(q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]), node.score_quant)
        probabilities = onto_grid(_softmax(scores), Quantization.per_tensor(1 / 256, -128))
        return probabilities @ v
    return linear_attention_exact(q, k, v, node.epsilon)


def exact_operator(node, args: list[NDArray], in_quants: list[Quantization | None]) -> NDArray:  # noqa: ANN001
    """The operator's mathematical result on real-valued inputs (before rounding onto its grid)."""
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
        return _attention(node, *args)
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
    return quant.values_of(value) if quant is not None and value.dtype == np.int8 else np.asarray(value)


def simulate(graph: Graph, *inputs: NDArray) -> NDArray[np.float64]:
    """The real values of ``graph``'s output for ``inputs`` (see module docstring)."""
    _check(graph, inputs)
    quants = graph.tensor_quants
    values = [_as_real(x, spec.quant) for x, spec in zip(inputs, graph.inputs)]
    for index, node in enumerate(graph.nodes):
        result = exact_operator(node, [values[i] for i in node.inputs], [quants[i] for i in node.inputs])
        out_quant = quants[len(graph.inputs) + index]
        values.append(onto_grid(result, out_quant) if out_quant is not None else result)
    return values[-1]


def operator_errors(graph: Graph, *inputs: NDArray) -> list[tuple[str, float]]:
    """Per operator: the worst distance, in output steps, between the engine's int8 output and
    the exact result rounded onto the same grid, both computed from the engine's own inputs.
    This is each operator's arithmetic error, without what earlier operators passed on."""
    _check(graph, inputs)
    graph(*inputs)  # validates the inputs
    quants = graph.tensor_quants
    values = list(inputs)
    errors = []
    for index, (node, record) in enumerate(zip(graph.nodes, graph.records)):
        args = [values[i] for i in node.inputs]
        out = node.run(record, *args)
        out_quant = quants[len(graph.inputs) + index]
        if out_quant is not None:
            in_real = [_as_real(a, quants[i]) for a, i in zip(args, node.inputs)]
            exact = onto_grid(exact_operator(node, in_real, [quants[i] for i in node.inputs]), out_quant)
            worst = np.abs(out_quant.values_of(out) - exact).max(initial=0.0) / float(out_quant.scale32[0])
            errors.append((f"{index}:{node.opcode}", float(worst)))
        values.append(out)
    return errors
