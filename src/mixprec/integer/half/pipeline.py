"""Mixed pipelines: int8 graphs joined to half-precision islands by bridges.

A :class:`Pipeline` runs its stages in order on a batch (first dimension) and reports, per
stage, the bytes of its constants and of its output per sample, and its time
(:meth:`Pipeline.profile`). Stage kinds:

- :class:`IntegerStage`: an int8 :class:`~mixprec.integer.graph.graph.Graph` with one input;
- :class:`ToHalfStage`: affine int8 -> half values by a 256-entry table (each entry the
  exact real value rounded once, see :mod:`mixprec.integer.half.bridges`);
- :class:`AttentionPoolStage`: ``mean_s(x + linear_attention(x))`` in the island
  (:mod:`mixprec.integer.half.ops`);
- :class:`ToInt8Stage`: half values -> affine int8 (nearest-even, saturating, NaN refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.profile import StageProfile, median_seconds
from mixprec.integer.core.tensors import Quantization, require_array
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import FullyConnectedNode
from mixprec.integer.half.bridges import half_values_to_int8, int8_to_half_table
from mixprec.integer.half.formats import half_format
from mixprec.integer.half.ops import LinearAttentionParams, half_add, half_mean, linear_attention
from mixprec.integer.ops.conversions import dequantize, quantize

HALF_BYTES = 2


@dataclass(frozen=True, eq=False)
class IntegerStage:
    """An int8 graph with one input and an int8 output."""

    name: str
    graph: Graph
    input_kind = "int8"
    output_kind = "int8"

    def __post_init__(self) -> None:
        if len(self.graph.inputs) != 1 or self.graph.inputs[0].dtype != "int8" or self.graph.output_quant is None:
            raise InputError(f"stage {self.name!r}: an integer stage needs a graph with one int8 input and output")

    @property
    def weight_bytes(self) -> int:
        total = 0
        for node in self.graph.nodes:
            if isinstance(node, FullyConnectedNode):
                total += node.weights.nbytes + (node.bias.nbytes if node.bias is not None else 0)
        return total

    def output_bytes(self) -> int:
        return int(np.prod(self.graph.tensor_shapes[-1][1:]))

    @property
    def output_quant(self) -> Quantization:
        return self.graph.output_quant

    def __call__(self, x: NDArray[np.int8]) -> NDArray[np.int8]:
        return self.graph(x)


@dataclass(frozen=True, eq=False)
class ToHalfStage:
    """Affine int8 on ``quant`` -> half values of ``dtype`` (float32 arrays), by table."""

    name: str
    quant: Quantization
    dtype: str
    shape: tuple[int, ...]
    input_kind = "int8"
    output_kind = "half"
    table: NDArray[np.float32] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        half_format(self.dtype)
        object.__setattr__(self, "table", int8_to_half_table(self.quant, self.dtype))

    weight_bytes = 0

    def output_bytes(self) -> int:
        return int(np.prod(self.shape)) * HALF_BYTES

    def __call__(self, x: NDArray[np.int8]) -> NDArray[np.float32]:
        return self.table[x.astype(np.int16) + 128]


@dataclass(frozen=True, eq=False)
class AttentionPoolStage:
    """``mean over steps of (x + linear_attention(x))``: ``[B, S, E]`` -> ``[B, E]`` half values."""

    name: str
    attention: LinearAttentionParams
    shape: tuple[int, ...]
    input_kind = "half"
    output_kind = "half"

    @property
    def dtype(self) -> str:
        return self.attention.dtype

    @property
    def weight_bytes(self) -> int:
        layers = (self.attention.query, self.attention.key, self.attention.value)
        return sum((layer.weight.size + (layer.bias.size if layer.bias is not None else 0)) * HALF_BYTES
                   for layer in layers)

    def output_bytes(self) -> int:
        return self.shape[-1] * HALF_BYTES

    def __call__(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        mixed = half_add(x, linear_attention(x, self.attention), self.dtype)
        return half_mean(mixed, axis=-2, dtype=self.dtype)


@dataclass(frozen=True, eq=False)
class ToInt8Stage:
    """Half values -> affine int8 on ``quant``."""

    name: str
    quant: Quantization
    shape: tuple[int, ...]
    input_kind = "half"
    output_kind = "int8"
    weight_bytes = 0

    def output_bytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def output_quant(self) -> Quantization:
        return self.quant

    def __call__(self, x: NDArray[np.float32]) -> NDArray[np.int8]:
        return half_values_to_int8(x, self.quant)


Stage = IntegerStage | ToHalfStage | AttentionPoolStage | ToInt8Stage


@dataclass(frozen=True, eq=False)
class Pipeline:
    """Stages from an int8 input on ``input_quant`` (shape ``input_shape`` per sample) to an
    int8 output; kinds must chain (int8 -> int8 or bridge, half -> half or bridge)."""

    input_quant: Quantization
    input_shape: tuple[int, ...]
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise InputError("a pipeline needs at least one stage")
        kind = "int8"
        for stage in self.stages:
            if stage.input_kind != kind:
                raise InputError(f"stage {stage.name!r} takes {stage.input_kind} values but receives {kind}")
            kind = stage.output_kind
        if kind != "int8":
            raise InputError("a pipeline must end in int8 (add a ToInt8Stage)")

    @property
    def output_quant(self) -> Quantization:
        return self.stages[-1].output_quant

    def __call__(self, x: NDArray[np.int8]) -> NDArray[np.int8]:
        """int8 ``[B, *input_shape]`` -> int8 output codes."""
        self.check_input(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def quantize_input(self, x: NDArray[np.float32]) -> NDArray[np.int8]:
        """float32 inputs onto ``input_quant`` (:func:`~mixprec.integer.ops.conversions.quantize`)."""
        return quantize(np.asarray(x, dtype=np.float32), self.input_quant.scale[0], self.input_quant.zero_point[0])

    def run_codes(self, x: NDArray[np.float32]) -> NDArray[np.int8]:
        """Quantize float32 inputs, run; the int8 output codes."""
        return self(self.quantize_input(x))

    def run_float(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Quantize float32 inputs, run, dequantize the output."""
        out = self.output_quant
        return dequantize(self.run_codes(x), out.scale[0], out.zero_point[0])

    def profile(self, x: NDArray[np.int8], repeats: int = 5) -> list[StageProfile]:
        """Per stage: constant bytes, output bytes per sample, median time over ``repeats`` runs."""
        self.check_input(x)
        seconds = median_seconds([(stage, (-1,)) for stage in self.stages], [x], repeats)
        return [StageProfile(stage.name, stage.weight_bytes, stage.output_bytes(), spent)
                for stage, spent in zip(self.stages, seconds)]

    def check_input(self, x: NDArray) -> None:
        """Refuse anything but int8 ``[batch, *input_shape]``."""
        require_array("the pipeline", x, np.int8)
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(f"the pipeline takes [batch, {', '.join(map(str, self.input_shape))}] inputs, "
                             f"got shape {x.shape}")
