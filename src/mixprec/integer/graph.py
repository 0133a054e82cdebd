"""An integer graph: int8 operators over numbered tensors, with the float-side quantization a
.tflite file stores, and the integer runtime records derived from it exactly as LiteRT
derives them (the float arithmetic of each op's ``Prepare``, reproduced step by step).

Tensors ``0 .. len(inputs) - 1`` are the graph's inputs; node ``i`` produces tensor
``len(inputs) + i``; the last node's tensor is the output. Float-side parameters are kept
only to export and to derive the runtime records; running the graph touches integers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.activations import (
    FIXED_OUTPUT,
    SoftmaxParams,
    TableParams,
    apply_table,
    lookup_table,
    round_half_away,
    softmax,
    softmax_params,
)
from mixprec.integer.elementwise import ADD_LEFT_SHIFT, AddParams, MulParams, add, mul
from mixprec.integer.fixedpoint import quantize_multiplier
from mixprec.integer.fully_connected import FullyConnectedParams, fully_connected

ACTIVATIONS = ("none", "relu", "relu6")


@dataclass(frozen=True)
class Quantization:
    """Affine parameters of one tensor as stored in a .tflite file: float32 ``scale`` and
    integer ``zero_point`` (one each per tensor, or one per channel along ``axis``);
    ``real = scale * (q - zero_point)``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        scales = np.asarray(self.scale, dtype=np.float64)
        if len(self.scale) == 0 or len(self.scale) != len(self.zero_point):
            raise InputError(f"need one zero point per scale, got {len(self.scale)} scales and "
                             f"{len(self.zero_point)} zero points")
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0) or np.any(scales != scales.astype(np.float32)):
            raise InputError(f"scales must be positive finite float32 values, got {self.scale[:4]}")

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int = 0) -> Quantization:
        return cls((float(np.float32(scale)),), (int(zero_point),))

    @property
    def scale32(self) -> NDArray[np.float32]:
        return np.asarray(self.scale, dtype=np.float32)


def activation_range(activation: str, output: Quantization) -> tuple[int, int]:
    """TFLite ``CalculateActivationRangeQuantized`` for int8 (``f / scale`` in float32)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; choose {', '.join(ACTIVATIONS)}")
    scale, zero_point = output.scale32[0], output.zero_point[0]

    def quantize(value: float) -> int:
        return zero_point + int(round_half_away(np.float32(value) / scale))

    if activation == "none":
        return -128, 127
    low = max(-128, quantize(0.0))
    return low, 127 if activation == "relu" else min(127, quantize(6.0))


@dataclass(frozen=True)
class TensorSpec:
    """A graph input: name, shape (first dimension the batch) and quantization."""

    name: str
    shape: tuple[int, ...]
    quant: Quantization

    def __post_init__(self) -> None:
        if len(self.shape) < 1 or any(int(d) < 1 for d in self.shape):
            raise InputError(f"tensor {self.name!r}: shape must have positive sizes, got {self.shape}")
        if len(self.quant.scale) != 1:
            raise InputError(f"tensor {self.name!r}: activations are quantized per tensor")


def _check_activation_and_output(output_quant: Quantization, activation: str) -> None:
    if len(output_quant.scale) != 1:
        raise InputError("operator outputs are quantized per tensor")
    activation_range(activation, output_quant)


@dataclass(frozen=True, eq=False)
class FullyConnectedNode:
    """FULLY_CONNECTED of tensor ``inputs[0]``: int8 weights ``[out, in]`` (zero points 0, one
    scale or one per output channel), optional int32 bias, output quantization, activation."""

    inputs: tuple[int, ...]
    weights: NDArray[np.int8]
    weight_quant: Quantization
    bias: NDArray[np.int32] | None
    output_quant: Quantization
    activation: str = "none"
    opcode = "FULLY_CONNECTED"

    def __post_init__(self) -> None:
        out_features = self.weights.shape[0]
        if len(self.inputs) != 1:
            raise InputError(f"FULLY_CONNECTED takes one input tensor, got {self.inputs}")
        if len(self.weight_quant.scale) not in (1, out_features) or any(self.weight_quant.zero_point):
            raise InputError(f"weights need one scale or {out_features} (per output channel) and zero points 0")
        _check_activation_and_output(self.output_quant, self.activation)

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        if shapes[0][-1] != self.weights.shape[1]:
            raise InputError(f"FULLY_CONNECTED takes {self.weights.shape[1]} features but receives {shapes[0][-1]}")
        return (*shapes[0][:-1], self.weights.shape[0])

    def record(self, quants: Sequence[Quantization]) -> FullyConnectedParams:
        """LiteRT's arithmetic: per tensor ``double(float(s_in * s_w)) / double(s_out)``; per
        channel ``double(s_in) * double(s_w[c]) / double(s_out)``; then :func:`quantize_multiplier`."""
        s_in, s_out = quants[0].scale32[0], self.output_quant.scale32[0]
        s_w = self.weight_quant.scale32
        if len(s_w) == 1:
            reals = [float(np.float32(s_in * s_w[0])) / float(s_out)]
        else:
            reals = [float(s_in) * float(s) / float(s_out) for s in s_w]
        pairs = [quantize_multiplier(real) for real in reals]
        low, high = activation_range(self.activation, self.output_quant)
        return FullyConnectedParams(
            weights=self.weights, bias=self.bias, input_offset=-quants[0].zero_point[0],
            multiplier=np.array([m for m, _ in pairs], dtype=np.int32),
            shift=np.array([s for _, s in pairs], dtype=np.int32),
            output_offset=self.output_quant.zero_point[0], activation_min=low, activation_max=high)

    @staticmethod
    def run(record: FullyConnectedParams, x: NDArray[np.int8]) -> NDArray[np.int8]:
        return fully_connected(x, record)


@dataclass(frozen=True, eq=False)
class _BinaryNode:
    inputs: tuple[int, ...]
    output_quant: Quantization
    activation: str = "none"

    def __post_init__(self) -> None:
        if len(self.inputs) != 2:
            raise InputError(f"{self.opcode} takes two input tensors, got {self.inputs}")
        _check_activation_and_output(self.output_quant, self.activation)

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        try:
            return tuple(np.broadcast_shapes(*shapes))
        except ValueError:
            raise InputError(f"{self.opcode}: shapes {list(shapes)} do not broadcast") from None


@dataclass(frozen=True, eq=False)
class AddNode(_BinaryNode):
    """ADD of two tensors (broadcasting)."""

    opcode = "ADD"

    def record(self, quants: Sequence[Quantization]) -> AddParams:
        """LiteRT's ``Prepare``: ``twice_max = 2 * max(s_a, s_b)`` (float32); input multipliers
        ``s / twice_max``; output ``twice_max / float32(2^20 * s_out)`` (in double)."""
        s_a, s_b, s_out = quants[0].scale32[0], quants[1].scale32[0], self.output_quant.scale32[0]
        twice_max = np.float32(2) * max(s_a, s_b)
        a_m, a_s = quantize_multiplier(float(s_a) / float(twice_max))
        b_m, b_s = quantize_multiplier(float(s_b) / float(twice_max))
        o_m, o_s = quantize_multiplier(float(twice_max) / float(np.float32(2**ADD_LEFT_SHIFT) * s_out))
        low, high = activation_range(self.activation, self.output_quant)
        return AddParams(-quants[0].zero_point[0], -quants[1].zero_point[0], a_m, a_s, b_m, b_s, o_m, o_s,
                         self.output_quant.zero_point[0], low, high)

    @staticmethod
    def run(record: AddParams, a: NDArray[np.int8], b: NDArray[np.int8]) -> NDArray[np.int8]:
        return add(a, b, record)


@dataclass(frozen=True, eq=False)
class MulNode(_BinaryNode):
    """MUL of two tensors (broadcasting)."""

    opcode = "MUL"

    def record(self, quants: Sequence[Quantization]) -> MulParams:
        """LiteRT's ``Prepare``: ``double(s_a) * double(s_b) / double(s_out)``."""
        s_a, s_b, s_out = quants[0].scale32[0], quants[1].scale32[0], self.output_quant.scale32[0]
        multiplier, shift = quantize_multiplier(float(s_a) * float(s_b) / float(s_out))
        low, high = activation_range(self.activation, self.output_quant)
        return MulParams(-quants[0].zero_point[0], -quants[1].zero_point[0], multiplier, shift,
                         self.output_quant.zero_point[0], low, high)

    @staticmethod
    def run(record: MulParams, a: NDArray[np.int8], b: NDArray[np.int8]) -> NDArray[np.int8]:
        return mul(a, b, record)


@dataclass(frozen=True, eq=False)
class _UnaryNode:
    inputs: tuple[int, ...]
    activation = "none"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"{self.opcode} takes one input tensor, got {self.inputs}")

    @property
    def output_quant(self) -> Quantization:
        """Fixed by the op: LOGISTIC and SOFTMAX ``1/256, -128``; TANH ``1/128, 0``."""
        return Quantization.per_tensor(*FIXED_OUTPUT[self.opcode])

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return shapes[0]


@dataclass(frozen=True, eq=False)
class LogisticNode(_UnaryNode):
    """LOGISTIC (sigmoid) by a 256-entry table built in float32 from the input's quantization."""

    opcode = "LOGISTIC"

    def record(self, quants: Sequence[Quantization]) -> TableParams:
        return TableParams(lookup_table(self.opcode, float(quants[0].scale32[0]), quants[0].zero_point[0]))

    @staticmethod
    def run(record: TableParams, x: NDArray[np.int8]) -> NDArray[np.int8]:
        return apply_table(x, record)


@dataclass(frozen=True, eq=False)
class TanhNode(LogisticNode):
    """TANH by a 256-entry table built in float32 from the input's quantization."""

    opcode = "TANH"


@dataclass(frozen=True, eq=False)
class SoftmaxNode(_UnaryNode):
    """SOFTMAX over the last axis with ``beta``."""

    beta: float = 1.0
    opcode = "SOFTMAX"

    def record(self, quants: Sequence[Quantization]) -> SoftmaxParams:
        return softmax_params(float(quants[0].scale32[0]), self.beta)

    @staticmethod
    def run(record: SoftmaxParams, x: NDArray[np.int8]) -> NDArray[np.int8]:
        return softmax(x, record)


Node = FullyConnectedNode | AddNode | MulNode | LogisticNode | TanhNode | SoftmaxNode


@dataclass(frozen=True, eq=False)
class Graph:
    """Int8 operators over numbered tensors (see module docstring); calling it with one int8
    array per input runs the integer records only. The batch (first) dimension of each input
    may differ from the declared one."""

    inputs: tuple[TensorSpec, ...]
    nodes: tuple[Node, ...]
    _records: tuple[Any, ...] = field(init=False, repr=False)
    _shapes: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    _quants: tuple[Quantization, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.inputs or not self.nodes:
            raise InputError("a graph needs at least one input and one operator")
        shapes = [tuple(spec.shape) for spec in self.inputs]
        quants = [spec.quant for spec in self.inputs]
        records = []
        for index, node in enumerate(self.nodes):
            known = len(shapes)
            if any(not 0 <= i < known for i in node.inputs):
                raise InputError(f"operator {index} ({node.opcode}) reads tensors {node.inputs}, but only tensors "
                                 f"0..{known - 1} exist before it")
            try:
                shapes.append(node.output_shape([shapes[i] for i in node.inputs]))
            except InputError as exc:
                raise InputError(f"operator {index}: {exc}") from None
            records.append(node.record([quants[i] for i in node.inputs]))
            quants.append(node.output_quant)
        object.__setattr__(self, "_records", tuple(records))
        object.__setattr__(self, "_shapes", tuple(shapes))
        object.__setattr__(self, "_quants", tuple(quants))

    @property
    def tensor_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    @property
    def tensor_quants(self) -> tuple[Quantization, ...]:
        return self._quants

    @property
    def output_quant(self) -> Quantization:
        return self._quants[-1]

    def __call__(self, *arrays: NDArray[np.int8]) -> NDArray[np.int8]:
        """Run on one int8 array per input (shapes as declared, batch dimension free)."""
        if len(arrays) != len(self.inputs):
            raise InputError(f"the graph takes {len(self.inputs)} input arrays, got {len(arrays)}")
        for spec, array in zip(self.inputs, arrays):
            if not isinstance(array, np.ndarray) or array.dtype != np.int8:
                raise InputError(f"input {spec.name!r} must be an int8 numpy array, got "
                                 f"{getattr(array, 'dtype', type(array).__name__)}")
            if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
                raise InputError(f"input {spec.name!r} has shape {array.shape}; the model's is {spec.shape} "
                                 "(any batch size)")
        values = list(arrays)
        for node, record in zip(self.nodes, self._records):
            values.append(node.run(record, *(values[i] for i in node.inputs)))
        return values[-1]
