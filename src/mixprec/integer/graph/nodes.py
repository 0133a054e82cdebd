"""Operators of an integer graph. Each node holds the float-side description a .tflite file
stores (quantization, options) and derives its integer runtime record exactly as LiteRT's
``Prepare`` does (the float arithmetic reproduced step by step); ``run`` applies the record.

A node's ``inputs`` are tensor numbers of its graph; ``output_dtype`` is ``"int8"`` unless
stated; ``output_quant`` is the output's quantization (None for float32 outputs).

TFLite's 16x8 mode: FULLY_CONNECTED, CONV_2D and DEPTHWISE_CONV_2D (int8 weights, int64 or
int32 bias), the pools, PAD, RESHAPE, CONCATENATION, ADD, MUL, MEAN, SOFTMAX, LOGISTIC and TANH take int16 tensors
(zero point 0) as well as int8 and give the type they take; QUANTIZE converts float32, int8 and
int16 into either type and DEQUANTIZE reads both, so one graph mixes int8 and int16 per
operator. mixprec's own EMBEDDING (an int16 table gives int16 rows), ADD_CONSTANT, LAYER_NORM
and the two attentions have int16 forms too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import quantize_multiplier
from mixprec.integer.core.tensors import Quantization, activation_range, check_code_grid
from mixprec.integer.ops.activations import (
    FIXED_OUTPUT,
    SoftmaxParams,
    TableParams,
    apply_table,
    lookup_table,
    softmax,
    softmax_params,
)
from mixprec.integer.ops.attention import (
    Int16AttentionParams,
    LinearAttentionInt8Params,
    SoftmaxAttentionParams,
    int16_attention_params,
    linear_attention16,
    linear_attention_int8,
    linear_attention_int8_params,
    softmax_attention,
    softmax_attention16,
    softmax_attention_params,
)
from mixprec.integer.ops.conv import ConvParams, PoolParams, conv2d, pad, pool2d
from mixprec.integer.ops.conversions import RequantizeParams, dequantize, quantize, requantize, requantize_params
from mixprec.integer.ops.elementwise import ADD_LEFT_SHIFTS, AddParams, MulParams, add, mul
from mixprec.integer.ops.fully_connected import FullyConnectedParams, fully_connected
from mixprec.integer.ops.layer_norm import LayerNormParams, layer_norm, layer_norm_params
from mixprec.integer.ops.mean import MeanParams, mean, mean_params, mean_shape
from mixprec.integer.ops.sigmoid16 import SIGMOID16_OUTPUT, Sigmoid16Params, sigmoid16, sigmoid16_params
from mixprec.integer.ops.softmax16 import SOFTMAX16_OUTPUT, Softmax16Params, softmax16, softmax16_params


class _Node:
    """What every node shares: int8 inputs and output unless a node says otherwise."""

    input_dtypes: tuple[str, ...] = ("int8",)
    output_dtype = "int8"

    def result_quant(self, quants: Sequence[Quantization | None]) -> Quantization | None:
        """The output tensor's quantization given the inputs' (most ops fix their own)."""
        return self.output_quant

    def result_dtype(self, dtypes: Sequence[str]) -> str:
        """The output tensor's element type given the inputs' (most ops fix their own)."""
        return self.output_dtype

    def result_grid(self, quants: Sequence[Quantization | None], dtypes: Sequence[str]) -> Quantization | None:
        """The output's quantization given the inputs' quantizations and types (by default
        :meth:`result_quant`; an op whose fixed grid depends on the type says so)."""
        return self.result_quant(quants)

    def prepare(self, quants: Sequence[Quantization | None], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> object:
        """LiteRT's ``Prepare``: the runtime record for inputs of these quantizations, shapes and
        element types (nodes whose arithmetic ignores the types define ``record(quants, shapes)``)."""
        return self.record(quants, shapes)


class _EitherWidth:
    """Mixed into nodes that take int8 or int16 (16x8) input and give the type they take."""

    input_dtypes = ("int8", "int16")

    def result_dtype(self, dtypes: Sequence[str]) -> str:
        return dtypes[0]


class _KeepsGrid(_EitherWidth):
    """Mixed into the nodes that move codes without changing them (pooling, PAD, RESHAPE,
    CONCATENATION): the output keeps the input's type and quantization."""

    def result_quant(self, quants: Sequence[Quantization | None]) -> Quantization | None:
        return quants[0]


def channel_multipliers(input_quant: Quantization, weight_quant: Quantization,
                        output_quant: Quantization) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Fixed-point rescale per weight scale, as LiteRT computes it for FULLY_CONNECTED and the
    convolutions: ``double(s_in) * double(s_w[c]) / double(s_out)``, then
    :func:`quantize_multiplier`. (Rounding the product to float32 first gave a multiplier a few
    units off and, on about 1 in 60 random two-layer graphs, one output 1 LSB from LiteRT.)"""
    s_in, s_out = float(input_quant.scale32[0]), float(output_quant.scale32[0])
    pairs = [quantize_multiplier(s_in * float(s) / s_out) for s in weight_quant.scale32]
    return np.array([m for m, _ in pairs], dtype=np.int32), np.array([s for _, s in pairs], dtype=np.int32)


def _check_activation_and_output(output_quant: Quantization, activation: str) -> None:
    if len(output_quant.scale) != 1:
        raise InputError("operator outputs are quantized per tensor")
    activation_range(activation, output_quant)


@dataclass(frozen=True, eq=False)
class FullyConnectedNode(_EitherWidth, _Node):
    """FULLY_CONNECTED of tensor ``inputs[0]``: int8 weights ``[out, in]`` (zero points 0, one
    scale or one per output channel), optional bias (int32; int64 or int32 for int16 input),
    output quantization, activation."""

    inputs: tuple[int, ...]
    weights: NDArray[np.int8]
    weight_quant: Quantization
    bias: NDArray | None
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

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> FullyConnectedParams:
        """LiteRT's arithmetic (:func:`channel_multipliers`)."""
        check_code_grid(dtypes[0], self.output_quant, "FULLY_CONNECTED output")
        multiplier, shift = channel_multipliers(quants[0], self.weight_quant, self.output_quant)
        low, high = activation_range(self.activation, self.output_quant, dtypes[0])
        return FullyConnectedParams(
            weights=self.weights, bias=self.bias, input_offset=-quants[0].zero_point[0], multiplier=multiplier,
            shift=shift, output_offset=self.output_quant.zero_point[0], activation_min=low, activation_max=high,
            dtype=dtypes[0])

    @staticmethod
    def run(record: FullyConnectedParams, x: NDArray) -> NDArray:
        return fully_connected(x, record)


@dataclass(frozen=True, eq=False)
class _ConvNode(_EitherWidth, _Node):
    """A 2-D convolution of the NHWC tensor ``inputs[0]`` (see :mod:`mixprec.integer.ops.conv`):
    int8 weights (zero points 0, one scale or one per output channel), optional bias (int32;
    int64 or int32 for int16 input), ``padding`` ``"SAME"`` / ``"VALID"``, ``stride`` and
    ``dilation`` as ``(h, w)``."""

    inputs: tuple[int, ...]
    weights: NDArray[np.int8]
    weight_quant: Quantization
    bias: NDArray | None
    output_quant: Quantization
    padding: str = "SAME"
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    activation: str = "none"
    depthwise = False

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"{self.opcode} takes one input tensor, got {self.inputs}")
        out = self.weights.shape[3] if self.depthwise else self.weights.shape[0]
        axis = 3 if self.depthwise else 0
        if len(self.weight_quant.scale) not in (1, out) or any(self.weight_quant.zero_point):
            raise InputError(f"{self.opcode} weights need one scale or {out} (per output channel) and zero points 0")
        if len(self.weight_quant.scale) > 1 and self.weight_quant.axis != axis:
            raise InputError(f"{self.opcode} per-channel weight scales run along axis {axis}, "
                             f"got {self.weight_quant.axis}")
        _check_activation_and_output(self.output_quant, self.activation)
        self._geometry()  # checks the geometry

    def _geometry(self) -> ConvParams:
        """A record with a unit rescale: its shapes and checks, not its arithmetic."""
        wide = self.bias is not None and self.bias.dtype == np.int64
        offset = 0 if wide else self.output_quant.zero_point[0]
        return self._params(np.zeros(1, np.int32), np.zeros(1, np.int32), 0, offset, "int16" if wide else "int8",
                            -128, 127)

    def _params(self, multiplier: NDArray[np.int32], shift: NDArray[np.int32], input_offset: int,
                output_offset: int, dtype: str, low: int, high: int) -> ConvParams:
        return ConvParams(weights=self.weights, bias=self.bias, input_offset=input_offset, multiplier=multiplier,
                          shift=shift, output_offset=output_offset, stride=tuple(self.stride),
                          dilation=tuple(self.dilation), padding=self.padding, depthwise=self.depthwise,
                          activation_min=low, activation_max=high, dtype=dtype)

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return self._geometry().output_shape(shapes[0])

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> ConvParams:
        """LiteRT's arithmetic (PopulateConvolutionQuantizationParams, :func:`channel_multipliers`)."""
        check_code_grid(dtypes[0], self.output_quant, f"{self.opcode} output")
        multiplier, shift = channel_multipliers(quants[0], self.weight_quant, self.output_quant)
        low, high = activation_range(self.activation, self.output_quant, dtypes[0])
        return self._params(multiplier, shift, -quants[0].zero_point[0], self.output_quant.zero_point[0], dtypes[0],
                            low, high)

    @staticmethod
    def run(record: ConvParams, x: NDArray) -> NDArray:
        return conv2d(x, record)


@dataclass(frozen=True, eq=False)
class Conv2DNode(_ConvNode):
    """CONV_2D: weights ``[out, kh, kw, in]``, per-channel scales along axis 0."""

    opcode = "CONV_2D"


@dataclass(frozen=True, eq=False)
class DepthwiseConv2DNode(_ConvNode):
    """DEPTHWISE_CONV_2D: weights ``[1, kh, kw, out]`` (``out`` a multiple of the input channels:
    the depth multiplier), per-channel scales along axis 3."""

    opcode = "DEPTHWISE_CONV_2D"
    depthwise = True


@dataclass(frozen=True, eq=False)
class _PoolNode(_KeepsGrid, _Node):
    """AVERAGE_POOL_2D / MAX_POOL_2D of the NHWC tensor ``inputs[0]``; the output keeps the
    input's quantization (LiteRT refuses int8 pooling that changes it)."""

    inputs: tuple[int, ...]
    filter: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    activation: str = "none"
    kind = "AVERAGE"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"{self.opcode} takes one input tensor, got {self.inputs}")
        PoolParams(self.kind, tuple(self.filter), tuple(self.stride), self.padding)

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return PoolParams(self.kind, tuple(self.filter), tuple(self.stride), self.padding).output_shape(shapes[0])

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> PoolParams:
        low, high = activation_range(self.activation, quants[0], dtypes[0])
        return PoolParams(self.kind, tuple(self.filter), tuple(self.stride), self.padding, low, high, dtypes[0])

    @staticmethod
    def run(record: PoolParams, x: NDArray) -> NDArray:
        return pool2d(x, record)


@dataclass(frozen=True, eq=False)
class AveragePool2DNode(_PoolNode):
    """AVERAGE_POOL_2D: the mean of each window's in-image points, rounded half away from zero."""

    opcode = "AVERAGE_POOL_2D"


@dataclass(frozen=True, eq=False)
class MaxPool2DNode(_PoolNode):
    """MAX_POOL_2D: the largest of each window's in-image points."""

    opcode = "MAX_POOL_2D"
    kind = "MAX"


@dataclass(frozen=True, eq=False)
class PadNode(_KeepsGrid, _Node):
    """PAD of tensor ``inputs[0]`` by ``paddings`` (one ``(before, after)`` pair per dimension,
    the batch's ``(0, 0)`` included) with the zero point; the quantization is kept."""

    inputs: tuple[int, ...]
    paddings: tuple[tuple[int, int], ...]
    opcode = "PAD"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"PAD takes one input tensor, got {self.inputs}")
        if any(len(pair) != 2 or min(pair) < 0 for pair in self.paddings) or tuple(self.paddings[:1]) != ((0, 0),):
            raise InputError(f"PAD needs non-negative (before, after) pairs and none on the batch, got {self.paddings}")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        if len(shapes[0]) != len(self.paddings):
            raise InputError(f"PAD has {len(self.paddings)} (before, after) pairs for a {len(shapes[0])}-D tensor")
        return tuple(size + before + after for size, (before, after) in zip(shapes[0], self.paddings))

    def record(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]]) -> tuple:
        return tuple(tuple(pair) for pair in self.paddings), quants[0].zero_point[0]

    @staticmethod
    def run(record: tuple, x: NDArray[np.int8]) -> NDArray[np.int8]:
        return pad(x, *record)


@dataclass(frozen=True, eq=False)
class _BinaryNode(_Node):
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
class AddNode(_EitherWidth, _BinaryNode):
    """ADD of two tensors (broadcasting), int8 or int16 (16x8, the general-scale path)."""

    opcode = "ADD"

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> AddParams:
        """LiteRT's ``Prepare``: ``twice_max = 2 * max(s_a, s_b)`` (float32); input multipliers
        ``s / twice_max``; output ``twice_max / float32(2^left_shift * s_out)`` (in double), the
        left shift 20 for int8 and 15 for int16."""
        if dtypes[0] != dtypes[1]:
            raise InputError(f"ADD takes two tensors of one type, got {dtypes[0]} and {dtypes[1]}")
        check_code_grid(dtypes[0], self.output_quant, "ADD output")
        s_a, s_b, s_out = quants[0].scale32[0], quants[1].scale32[0], self.output_quant.scale32[0]
        twice_max = np.float32(2) * max(s_a, s_b)
        a_m, a_s = quantize_multiplier(float(s_a) / float(twice_max))
        b_m, b_s = quantize_multiplier(float(s_b) / float(twice_max))
        left_shift = ADD_LEFT_SHIFTS[dtypes[0]]
        o_m, o_s = quantize_multiplier(float(twice_max) / float(np.float32(2**left_shift) * s_out))
        low, high = activation_range(self.activation, self.output_quant, dtypes[0])
        return AddParams(-quants[0].zero_point[0], -quants[1].zero_point[0], a_m, a_s, b_m, b_s, o_m, o_s,
                         self.output_quant.zero_point[0], low, high, dtypes[0])

    @staticmethod
    def run(record: AddParams, a: NDArray, b: NDArray) -> NDArray:
        return add(a, b, record)


@dataclass(frozen=True, eq=False)
class MulNode(_EitherWidth, _BinaryNode):
    """MUL of two tensors (broadcasting), int8 or int16 (16x8)."""

    opcode = "MUL"

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> MulParams:
        """LiteRT's ``Prepare``: ``s_a * s_b / s_out`` in float32 arithmetic (the scales' own type),
        then :func:`quantize_multiplier`. (The same ratio in double put 50 of 216,000 random 16x8
        outputs one step off LiteRT, all at near-ties; in float32, none.)"""
        if dtypes[0] != dtypes[1]:
            raise InputError(f"MUL takes two tensors of one type, got {dtypes[0]} and {dtypes[1]}")
        check_code_grid(dtypes[0], self.output_quant, "MUL output")
        s_a, s_b, s_out = quants[0].scale32[0], quants[1].scale32[0], self.output_quant.scale32[0]
        multiplier, shift = quantize_multiplier(float(np.float32(s_a * s_b) / s_out))
        low, high = activation_range(self.activation, self.output_quant, dtypes[0])
        return MulParams(-quants[0].zero_point[0], -quants[1].zero_point[0], multiplier, shift,
                         self.output_quant.zero_point[0], low, high, dtypes[0])

    @staticmethod
    def run(record: MulParams, a: NDArray, b: NDArray) -> NDArray:
        return mul(a, b, record)


@dataclass(frozen=True, eq=False)
class _UnaryNode(_Node):
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
class LogisticNode(_EitherWidth, _UnaryNode):
    """LOGISTIC (sigmoid): int8 by a 256-entry table built in float32 from the input's
    quantization; int16 (16x8, output grid ``1/32768, 0``) by LiteRT's interpolated sigmoid
    table (:mod:`mixprec.integer.ops.sigmoid16`)."""

    opcode = "LOGISTIC"

    def result_grid(self, quants: Sequence[Quantization | None], dtypes: Sequence[str]) -> Quantization | None:
        return Quantization.per_tensor(*SIGMOID16_OUTPUT) if dtypes[0] == "int16" else self.output_quant

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> TableParams | Sigmoid16Params:
        if dtypes[0] == "int16":
            return sigmoid16_params(self.opcode, float(quants[0].scale32[0]))
        return TableParams(lookup_table(self.opcode, float(quants[0].scale32[0]), quants[0].zero_point[0]))

    @staticmethod
    def run(record: TableParams | Sigmoid16Params, x: NDArray) -> NDArray:
        return sigmoid16(x, record) if isinstance(record, Sigmoid16Params) else apply_table(x, record)


@dataclass(frozen=True, eq=False)
class TanhNode(LogisticNode):
    """TANH: int8 by a 256-entry table built in float32 from the input's quantization; int16
    (16x8, output grid ``1/32768, 0``) by LiteRT's sigmoid table at twice the resolution."""

    opcode = "TANH"


@dataclass(frozen=True, eq=False)
class SoftmaxNode(_EitherWidth, _UnaryNode):
    """SOFTMAX over the last axis with ``beta``: int8 (output grid ``1/256, -128``) or 16x8
    (int16, output grid ``1/32768, 0``; :mod:`mixprec.integer.ops.softmax16`)."""

    beta: float = 1.0
    opcode = "SOFTMAX"

    def result_grid(self, quants: Sequence[Quantization | None], dtypes: Sequence[str]) -> Quantization | None:
        return Quantization.per_tensor(*SOFTMAX16_OUTPUT) if dtypes[0] == "int16" else self.output_quant

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> SoftmaxParams | Softmax16Params:
        if dtypes[0] == "int16":
            return softmax16_params(float(quants[0].scale32[0]), self.beta)
        return softmax_params(float(quants[0].scale32[0]), self.beta)

    @staticmethod
    def run(record: SoftmaxParams | Softmax16Params, x: NDArray) -> NDArray:
        return softmax16(x, record) if isinstance(record, Softmax16Params) else softmax(x, record)


@dataclass(frozen=True, eq=False)
class MeanNode(_EitherWidth, _Node):
    """MEAN of tensor ``inputs[0]`` over ``axes`` (never the batch axis 0), optionally keeping
    the reduced dimensions (see :mod:`mixprec.integer.ops.mean`)."""

    inputs: tuple[int, ...]
    axes: tuple[int, ...]
    output_quant: Quantization
    keep_dims: bool = False
    opcode = "MEAN"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"MEAN takes one input tensor, got {self.inputs}")
        _check_activation_and_output(self.output_quant, "none")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        rank = len(shapes[0])
        if not self.axes or any(not 1 <= a < rank for a in self.axes):
            raise InputError(f"MEAN reduces axes among 1..{rank - 1} of shape {shapes[0]} (axis 0 is the "
                             f"batch), got {self.axes}")
        return mean_shape(shapes[0], tuple(self.axes), self.keep_dims)

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> MeanParams:
        check_code_grid(dtypes[0], self.output_quant, "MEAN output")
        return mean_params(shapes[0], self.axes, self.keep_dims, quants[0].scale[0], quants[0].zero_point[0],
                           self.output_quant.scale[0], self.output_quant.zero_point[0], dtypes[0])

    @staticmethod
    def run(record: MeanParams, x: NDArray) -> NDArray:
        return mean(x, record)


@dataclass(frozen=True, eq=False)
class ReshapeNode(_KeepsGrid, _Node):
    """RESHAPE of tensor ``inputs[0]`` to ``(batch, *shape)``: the bytes are unchanged, the
    quantization carries over."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    opcode = "RESHAPE"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"RESHAPE takes one input tensor, got {self.inputs}")
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise InputError(f"RESHAPE needs positive non-batch sizes, got {self.shape}")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        if int(np.prod(shapes[0][1:])) != int(np.prod(self.shape)):
            raise InputError(f"RESHAPE cannot turn {shapes[0][1:]} into {self.shape} (per batch element)")
        return (shapes[0][0], *self.shape)

    def record(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(self.shape)

    @staticmethod
    def run(record: tuple[int, ...], x: NDArray[np.int8]) -> NDArray[np.int8]:
        return x.reshape(x.shape[0], *record)


@dataclass(frozen=True, eq=False)
class ConcatenationNode(_KeepsGrid, _Node):
    """CONCATENATION of tensors ``inputs`` along ``axis`` (not the batch; negative counts from
    the end). LiteRT's int8 and int16 kernels copy bytes: every input must already be on one
    grid, which the output keeps (TensorFlow's converter arranges that)."""

    inputs: tuple[int, ...]
    axis: int = -1
    opcode = "CONCATENATION"

    def __post_init__(self) -> None:
        if len(self.inputs) < 1:
            raise InputError("CONCATENATION takes at least one input tensor")

    def _axis(self, rank: int) -> int:
        axis = self.axis + rank if self.axis < 0 else self.axis
        if not 1 <= axis < rank:
            raise InputError(f"CONCATENATION axis {self.axis} must name a non-batch axis of the {rank}-D inputs")
        return axis

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        rank = len(shapes[0])
        axis = self._axis(rank)
        if any(len(s) != rank or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:] for s in shapes):
            raise InputError(f"CONCATENATION along axis {axis} needs inputs equal in every other dimension, "
                             f"got {list(shapes)}")
        return (*shapes[0][:axis], sum(s[axis] for s in shapes), *shapes[0][axis + 1:])

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> int:
        if any(q != quants[0] for q in quants) or any(d != dtypes[0] for d in dtypes):
            raise InputError("CONCATENATION inputs must share one type and one grid (scale and zero point): "
                             "LiteRT's integer kernel copies bytes; requantize the odd input first (QUANTIZE)")
        return self._axis(len(shapes[0]))

    @staticmethod
    def run(axis: int, *arrays: NDArray) -> NDArray:
        return np.concatenate(arrays, axis=axis)


@dataclass(frozen=True, eq=False)
class QuantizeNode(_Node):
    """QUANTIZE of tensor ``inputs[0]``: float32 -> ``output_dtype`` (int8 or int16:
    ``quantize``), or int8 / int16 -> ``output_dtype`` on a new grid (``requantize``), see
    :mod:`mixprec.integer.ops.conversions`."""

    inputs: tuple[int, ...]
    output_quant: Quantization
    output_dtype: str = "int8"
    opcode = "QUANTIZE"
    input_dtypes = ("float32", "int8", "int16")

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"QUANTIZE takes one input tensor, got {self.inputs}")
        if self.output_dtype not in ("int8", "int16"):
            raise InputError(f"QUANTIZE writes int8 or int16, got {self.output_dtype!r}")
        check_code_grid(self.output_dtype, self.output_quant, "QUANTIZE output")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return shapes[0]

    def prepare(self, quants: Sequence[Quantization | None], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> object:
        out = self.output_quant
        if quants[0] is None:
            return (out.scale[0], out.zero_point[0], self.output_dtype)
        return requantize_params(quants[0].scale[0], quants[0].zero_point[0], out.scale[0], out.zero_point[0],
                                 dtypes[0], self.output_dtype)

    @staticmethod
    def run(record: object, x: NDArray) -> NDArray:
        if isinstance(record, RequantizeParams):
            return requantize(x, record)
        return quantize(x, *record)


@dataclass(frozen=True, eq=False)
class DequantizeNode(_Node):
    """DEQUANTIZE of int8 or int16 tensor ``inputs[0]`` to float32 (see
    :mod:`mixprec.integer.ops.conversions`)."""

    inputs: tuple[int, ...]
    opcode = "DEQUANTIZE"
    output_dtype = "float32"
    input_dtypes = ("int8", "int16")

    def result_quant(self, quants: Sequence[Quantization | None]) -> Quantization | None:
        return None

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"DEQUANTIZE takes one input tensor, got {self.inputs}")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return shapes[0]

    def record(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]]) -> tuple[float, int]:
        return (quants[0].scale[0], quants[0].zero_point[0])

    @staticmethod
    def run(record: tuple[float, int], x: NDArray[np.int8]) -> NDArray[np.float32]:
        return dequantize(x, *record)


@dataclass(frozen=True, eq=False)
class EmbeddingNode(_Node):
    """Rows of an int8 ``table [V, E]`` (quantization ``table_quant``, any zero point) or an
    int16 one (zero point 0) gathered by the int32 token ids of tensor ``inputs[0]``; the output
    keeps the table's type and grid, so its zero point travels with it. Ids outside ``0..V-1``
    are refused."""

    inputs: tuple[int, ...]
    table: NDArray[np.int8]
    table_quant: Quantization
    opcode = "EMBEDDING"
    input_dtypes = ("int32",)

    def __post_init__(self) -> None:
        if len(self.inputs) != 1 or self.table.dtype not in (np.int8, np.int16) or self.table.ndim != 2:
            raise InputError("EMBEDDING takes one int32 id tensor and an int8 or int16 table [vocabulary, width]")
        _check_activation_and_output(self.table_quant, "none")
        check_code_grid(self.table.dtype.name, self.table_quant, "EMBEDDING table")

    @property
    def output_quant(self) -> Quantization:
        return self.table_quant

    def result_dtype(self, dtypes: Sequence[str]) -> str:
        return self.table.dtype.name

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return (*shapes[0], self.table.shape[1])

    def record(self, quants: Sequence[Quantization | None], shapes: Sequence[tuple[int, ...]]) -> NDArray[np.int8]:
        return self.table

    @staticmethod
    def run(record: NDArray, ids: NDArray[np.int32]) -> NDArray:
        bad = (ids < 0) | (ids >= record.shape[0])
        if bad.any():
            raise InputError(f"{int(bad.sum())} token ids lie outside 0..{record.shape[0] - 1} "
                             f"(for example {int(ids[bad].flat[0])})")
        return record[ids]


@dataclass(frozen=True, eq=False)
class AddConstantNode(_EitherWidth, _Node):
    """ADD of tensor ``inputs[0]`` and a ``constant`` of its type (int8, or int16 with zero point
    0) broadcast over the batch (for example a positional encoding ``[S, E]``), with ADD's
    arithmetic and rounding."""

    inputs: tuple[int, ...]
    constant: NDArray[np.int8]
    constant_quant: Quantization
    output_quant: Quantization
    opcode = "ADD_CONSTANT"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1 or self.constant.dtype not in (np.int8, np.int16):
            raise InputError("ADD_CONSTANT takes one input tensor and an int8 or int16 constant")
        _check_activation_and_output(self.constant_quant, "none")
        _check_activation_and_output(self.output_quant, "none")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        if tuple(shapes[0][1:]) != tuple(self.constant.shape):
            raise InputError(f"ADD_CONSTANT adds a {self.constant.shape} constant to {shapes[0][1:]} per batch element")
        return shapes[0]

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> tuple:
        if dtypes[0] != self.constant.dtype.name:
            raise InputError(f"ADD_CONSTANT adds an {self.constant.dtype.name} constant to {dtypes[0]} input")
        add_node = AddNode((0, 1), self.output_quant)
        return add_node.prepare([quants[0], self.constant_quant], shapes, (dtypes[0], dtypes[0])), self.constant

    @staticmethod
    def run(record: tuple, x: NDArray) -> NDArray:
        params, constant = record
        return add(x, constant, params)


@dataclass(frozen=True, eq=False)
class LayerNormNode(_EitherWidth, _Node):
    """Layer normalization over the last axis of tensor ``inputs[0]`` (int8, or int16 with zero
    points 0) in integers (:mod:`mixprec.integer.ops.layer_norm`), from float ``gamma``, ``beta``
    and ``epsilon``."""

    inputs: tuple[int, ...]
    gamma: NDArray[np.float32]
    beta: NDArray[np.float32]
    epsilon: float
    output_quant: Quantization
    opcode = "LAYER_NORM"

    def __post_init__(self) -> None:
        if len(self.inputs) != 1:
            raise InputError(f"LAYER_NORM takes one input tensor, got {self.inputs}")
        _check_activation_and_output(self.output_quant, "none")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        if shapes[0][-1] != len(self.gamma):
            raise InputError(f"LAYER_NORM has {len(self.gamma)} channels but receives {shapes[0][-1]}")
        return shapes[0]

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> LayerNormParams:
        check_code_grid(dtypes[0], self.output_quant, "LAYER_NORM output")
        return layer_norm_params(self.gamma, self.beta, self.epsilon, quants[0].scale[0], quants[0].zero_point[0],
                                 self.output_quant.scale[0], self.output_quant.zero_point[0])

    @staticmethod
    def run(record: LayerNormParams, x: NDArray) -> NDArray:
        return layer_norm(x, record)


def _scale_and_zero(quant: Quantization) -> tuple[float, int]:
    return quant.scale[0], quant.zero_point[0]


def _check_one_width(opcode: str, dtypes: Sequence[str], grids: Sequence[Quantization]) -> None:
    """Attention reads query, key and value of one type and writes its grids in that type."""
    if len(set(dtypes)) != 1:
        raise InputError(f"{opcode} takes query, key and value of one type, got {', '.join(dtypes)}")
    for grid in grids:
        check_code_grid(dtypes[0], grid, f"{opcode} grid")


@dataclass(frozen=True, eq=False)
class _AttentionNode(_EitherWidth, _Node):
    """Query, key and value of one type: int8, or int16 (zero points 0, the int16 forms of
    :mod:`mixprec.integer.ops.attention`)."""

    inputs: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.inputs) != 3:
            raise InputError(f"{self.opcode} takes query, key and value tensors, got {self.inputs}")
        _check_activation_and_output(self.output_quant, "none")

    def output_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        q, k, v = shapes
        if len(q) != 3 or q[:-1] != k[:-1] or k[:-1] != v[:-1] or q[-1] != k[-1]:
            raise InputError(f"{self.opcode} needs [B, S, P] query/key and [B, S, P_v] value, got {list(shapes)}")
        return v


@dataclass(frozen=True, eq=False)
class SoftmaxAttentionNode(_AttentionNode):
    """Softmax attention of (query, key, value) tensors, scores on ``score_quant``
    (:mod:`mixprec.integer.ops.attention`)."""

    score_quant: Quantization = None  # type: ignore[assignment]
    output_quant: Quantization = None  # type: ignore[assignment]
    opcode = "SOFTMAX_ATTENTION"

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> SoftmaxAttentionParams | Int16AttentionParams:
        _check_one_width(self.opcode, dtypes, (self.score_quant, self.output_quant))
        if dtypes[0] == "int16":
            return int16_attention_params(shapes[0][-1], *(q.scale[0] for q in quants), self.output_quant.scale[0],
                                          score=self.score_quant.scale[0])
        return softmax_attention_params(shapes[0][-1], *(_scale_and_zero(q) for q in quants),
                                        _scale_and_zero(self.score_quant), _scale_and_zero(self.output_quant))

    @staticmethod
    def run(record: SoftmaxAttentionParams | Int16AttentionParams, q: NDArray, k: NDArray, v: NDArray) -> NDArray:
        if isinstance(record, Int16AttentionParams):
            return softmax_attention16(q, k, v, record)
        return softmax_attention(q, k, v, record)


@dataclass(frozen=True, eq=False)
class LinearAttentionNode(_AttentionNode):
    """ReLU-feature linear attention of (query, key, value) tensors with ``epsilon``
    (:mod:`mixprec.integer.ops.attention`)."""

    epsilon: float = 1.0
    output_quant: Quantization = None  # type: ignore[assignment]
    opcode = "LINEAR_ATTENTION"

    def prepare(self, quants: Sequence[Quantization], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> LinearAttentionInt8Params | Int16AttentionParams:
        _check_one_width(self.opcode, dtypes, (self.output_quant,))
        if dtypes[0] == "int16":
            return int16_attention_params(shapes[0][-1], *(q.scale[0] for q in quants), self.output_quant.scale[0],
                                          epsilon=self.epsilon)
        return linear_attention_int8_params(self.epsilon, *(_scale_and_zero(q) for q in quants),
                                            _scale_and_zero(self.output_quant))

    @staticmethod
    def run(record: LinearAttentionInt8Params | Int16AttentionParams, q: NDArray, k: NDArray, v: NDArray) -> NDArray:
        if isinstance(record, Int16AttentionParams):
            return linear_attention16(q, k, v, record)
        return linear_attention_int8(q, k, v, record)


Node = (FullyConnectedNode | Conv2DNode | DepthwiseConv2DNode | AveragePool2DNode | MaxPool2DNode | PadNode
        | AddNode | MulNode | LogisticNode | TanhNode | SoftmaxNode | MeanNode | ReshapeNode | ConcatenationNode
        | QuantizeNode | DequantizeNode | EmbeddingNode | AddConstantNode | LayerNormNode | SoftmaxAttentionNode
        | LinearAttentionNode)
