"""Mixed pipelines: int8 (or 16x8 int16) graphs joined to half-precision islands by bridges.

A :class:`Pipeline` runs its stages in order on a batch (first dimension) and reports, per
stage, the bytes of its constants and of its output per sample, and its time
(:meth:`Pipeline.profile`). Stage kinds:

- :class:`IntegerStage`: an integer :class:`~mixprec.integer.graph.graph.Graph` with one input
  (int8 or int16 in and out);
- :class:`ToHalfStage`: affine int8 (or int16) -> half values by a table of every code (each
  entry the exact real value rounded once, see :mod:`mixprec.integer.half.bridges`);
- :class:`AttentionPoolStage`: ``mean_s(x + linear_attention(x))`` in the island
  (:mod:`mixprec.integer.half.ops`);
- :class:`ToInt8Stage`: half values -> affine int8, or int16 (nearest-even, saturating, NaN
  refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.profile import StageProfile, median_seconds
from mixprec.integer.core.tensors import CODE_RANGES, Quantization, check_code_grid, require_array
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import FullyConnectedNode
from mixprec.integer.half.bridges import half_values_to_int8, int8_to_half_table
from mixprec.integer.half.formats import half_format
from mixprec.integer.half.ops import LinearAttentionParams, half_add, half_mean, linear_attention
from mixprec.integer.ops.conversions import dequantize, quantize

HALF_BYTES = 2
#: The integer code types a stage reads or writes.
CODES = tuple(CODE_RANGES)


@dataclass(frozen=True, eq=False)
class IntegerStage:
    """An integer graph with one input and an output, int8 or int16 each."""

    name: str
    graph: Graph

    def __post_init__(self) -> None:
        if len(self.graph.inputs) != 1 or self.input_kind not in CODES or self.output_kind not in CODES:
            raise InputError(f"stage {self.name!r}: an integer stage needs a graph with one int8 or int16 input "
                             "and such an output")

    @property
    def input_kind(self) -> str:
        return self.graph.inputs[0].dtype

    @property
    def output_kind(self) -> str:
        return self.graph.tensor_dtypes[-1]

    @property
    def weight_bytes(self) -> int:
        total = 0
        for node in self.graph.nodes:
            if isinstance(node, FullyConnectedNode):
                total += node.weights.nbytes + (node.bias.nbytes if node.bias is not None else 0)
        return total

    def output_bytes(self) -> int:
        return int(np.prod(self.graph.tensor_shapes[-1][1:])) * np.dtype(self.output_kind).itemsize

    @property
    def output_quant(self) -> Quantization:
        return self.graph.output_quant

    def __call__(self, x: NDArray) -> NDArray:
        return self.graph(x)


@dataclass(frozen=True, eq=False)
class ToHalfStage:
    """Affine int8 (or int16: ``codes``) on ``quant`` -> half values of ``dtype`` (float32
    arrays), by table."""

    name: str
    quant: Quantization
    dtype: str
    shape: tuple[int, ...]
    codes: str = "int8"
    output_kind = "half"
    table: NDArray[np.float32] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        half_format(self.dtype)
        if self.codes not in CODES:
            raise InputError(f"stage {self.name!r}: a bridge reads int8 or int16 codes, got {self.codes!r}")
        object.__setattr__(self, "table", int8_to_half_table(self.quant, self.dtype, self.codes))

    @property
    def input_kind(self) -> str:
        return self.codes

    weight_bytes = 0

    def output_bytes(self) -> int:
        return int(np.prod(self.shape)) * HALF_BYTES

    def __call__(self, x: NDArray) -> NDArray[np.float32]:
        return self.table[x.astype(np.int32) - CODE_RANGES[self.codes][0]]


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
    """Half values -> affine int8 (or int16: ``codes``) on ``quant``."""

    name: str
    quant: Quantization
    shape: tuple[int, ...]
    codes: str = "int8"
    input_kind = "half"
    weight_bytes = 0

    def __post_init__(self) -> None:
        if self.codes not in CODES:
            raise InputError(f"stage {self.name!r}: a bridge writes int8 or int16 codes, got {self.codes!r}")
        check_code_grid(self.codes, self.quant, f"stage {self.name!r}")

    @property
    def output_kind(self) -> str:
        return self.codes

    def output_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.codes).itemsize

    @property
    def output_quant(self) -> Quantization:
        return self.quant

    def __call__(self, x: NDArray[np.float32]) -> NDArray:
        return half_values_to_int8(x, self.quant, self.codes)


Stage = IntegerStage | ToHalfStage | AttentionPoolStage | ToInt8Stage


@dataclass(frozen=True, eq=False)
class Pipeline:
    """Stages from an integer input on ``input_quant`` (shape ``input_shape`` per sample; int8,
    or int16 when the first stage takes int16) to an integer output; kinds must chain (codes
    -> codes of the same type or a bridge, half -> half or a bridge)."""

    input_quant: Quantization
    input_shape: tuple[int, ...]
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise InputError("a pipeline needs at least one stage")
        kind = self.input_kind
        if kind not in CODES:
            raise InputError(f"a pipeline starts from int8 or int16 codes, but stage {self.stages[0].name!r} takes "
                             f"{kind} values")
        for stage in self.stages:
            if stage.input_kind != kind:
                raise InputError(f"stage {stage.name!r} takes {stage.input_kind} values but receives {kind}")
            kind = stage.output_kind
        if kind not in CODES:
            raise InputError("a pipeline must end in int8 or int16 codes (add a ToInt8Stage)")

    @property
    def input_kind(self) -> str:
        """The input codes' type: what the first stage takes."""
        return self.stages[0].input_kind

    @property
    def output_quant(self) -> Quantization:
        return self.stages[-1].output_quant

    def __call__(self, x: NDArray) -> NDArray:
        """Input codes ``[B, *input_shape]`` -> output codes."""
        self.check_input(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def quantize_input(self, x: NDArray[np.float32]) -> NDArray:
        """float32 inputs onto ``input_quant`` (:func:`~mixprec.integer.ops.conversions.quantize`)."""
        return quantize(np.asarray(x, dtype=np.float32), self.input_quant.scale[0], self.input_quant.zero_point[0],
                        self.input_kind)

    def run_codes(self, x: NDArray[np.float32]) -> NDArray:
        """Quantize float32 inputs, run; the output codes."""
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

    def arena_bytes(self) -> int:
        """Activation bytes per sample the stages need when each runs alone and its input dies
        after it: the largest input-plus-output pair (the input codes into the first stage)."""
        size = int(np.prod(self.input_shape)) * np.dtype(self.input_kind).itemsize
        peak = 0
        for stage in self.stages:
            peak = max(peak, size + stage.output_bytes())
            size = stage.output_bytes()
        return peak

    def check_input(self, x: NDArray) -> None:
        """Refuse anything but input codes ``[batch, *input_shape]``."""
        require_array("the pipeline", x, np.dtype(self.input_kind).type)
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(f"the pipeline takes [batch, {', '.join(map(str, self.input_shape))}] inputs, "
                             f"got shape {x.shape}")
