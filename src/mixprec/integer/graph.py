"""An integer graph: a chain of int8 operators with the float-side quantization a .tflite
file stores, and the integer runtime records derived from it exactly as LiteRT derives them.

Float-side parameters are kept only to export and to derive the runtime records; running
the graph touches integers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
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


def _round_away(value: NDArray[np.float32]) -> NDArray[np.int64]:
    """``TfLiteRound`` (``std::round``): nearest, ties away from zero."""
    return (np.sign(value) * np.floor(np.abs(value) + np.float32(0.5))).astype(np.int64)


def activation_range(activation: str, output: Quantization) -> tuple[int, int]:
    """TFLite ``CalculateActivationRangeQuantized`` for int8 (``f / scale`` in float32)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; choose {', '.join(ACTIVATIONS)}")
    scale, zero_point = output.scale32[0], output.zero_point[0]

    def quantize(value: float) -> int:
        return zero_point + int(_round_away(np.float32(value) / scale))

    if activation == "none":
        return -128, 127
    low = max(-128, quantize(0.0))
    return low, 127 if activation == "relu" else min(127, quantize(6.0))


@dataclass(frozen=True, eq=False)
class FullyConnectedNode:
    """An int8 FULLY_CONNECTED operator: int8 weights ``[out, in]`` (zero points 0, one scale
    or one per output channel), optional int32 bias, the output's quantization and a fused
    activation."""

    weights: NDArray[np.int8]
    weight_quant: Quantization
    bias: NDArray[np.int32] | None
    output_quant: Quantization
    activation: str = "none"

    def __post_init__(self) -> None:
        out_features = self.weights.shape[0]
        if len(self.weight_quant.scale) not in (1, out_features) or any(self.weight_quant.zero_point):
            raise InputError(f"weights need one scale or {out_features} (per output channel) and zero points 0")
        if len(self.output_quant.scale) != 1:
            raise InputError("the output of a fully connected layer is quantized per tensor")
        activation_range(self.activation, self.output_quant)

    def params(self, input_quant: Quantization) -> FullyConnectedParams:
        """The runtime record, with LiteRT's multiplier arithmetic: per tensor
        ``double(float(s_in * s_w)) / double(s_out)``; per channel ``double(s_in) *
        double(s_w[c]) / double(s_out)``; then :func:`quantize_multiplier`."""
        s_in, s_out = input_quant.scale32[0], self.output_quant.scale32[0]
        s_w = self.weight_quant.scale32
        if len(s_w) == 1:
            reals = [float(np.float32(s_in * s_w[0])) / float(s_out)]
        else:
            reals = [float(s_in) * float(s) / float(s_out) for s in s_w]
        pairs = [quantize_multiplier(real) for real in reals]
        low, high = activation_range(self.activation, self.output_quant)
        return FullyConnectedParams(
            weights=self.weights, bias=self.bias, input_offset=-input_quant.zero_point[0],
            multiplier=np.array([m for m, _ in pairs], dtype=np.int32),
            shift=np.array([s for _, s in pairs], dtype=np.int32),
            output_offset=self.output_quant.zero_point[0], activation_min=low, activation_max=high)


@dataclass(frozen=True, eq=False)
class Graph:
    """A chain of int8 operators from one int8 input of ``input_shape`` (first dimension the
    batch) to one int8 output; calling it runs the integer records only."""

    input_shape: tuple[int, ...]
    input_quant: Quantization
    nodes: tuple[FullyConnectedNode, ...]
    _records: tuple[FullyConnectedParams, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise InputError("a graph needs at least one operator")
        if len(self.input_shape) < 2 or any(int(d) < 1 for d in self.input_shape):
            raise InputError(f"input_shape must be [batch, ..., features] with positive sizes, got {self.input_shape}")
        records, quant, width = [], self.input_quant, self.input_shape[-1]
        for index, node in enumerate(self.nodes):
            if node.weights.shape[1] != width:
                raise InputError(f"operator {index} takes {node.weights.shape[1]} features but receives {width}")
            records.append(node.params(quant))
            quant, width = node.output_quant, node.weights.shape[0]
        object.__setattr__(self, "_records", tuple(records))

    @property
    def output_quant(self) -> Quantization:
        return self.nodes[-1].output_quant

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (*self.input_shape[:-1], self.nodes[-1].weights.shape[0])

    def __call__(self, x: NDArray[np.int8]) -> NDArray[np.int8]:
        """Run on int8 ``x`` of shape ``[..., *input_shape[1:]]`` (any leading batch)."""
        if not isinstance(x, np.ndarray) or x.dtype != np.int8:
            raise InputError(f"the graph takes an int8 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
        tail = self.input_shape[1:]
        if x.ndim < len(tail) or tuple(x.shape[x.ndim - len(tail):]) != tail:
            raise InputError(f"input shape {x.shape} does not match the model's {self.input_shape}")
        for record in self._records:
            x = fully_connected(x, record)
        return x
