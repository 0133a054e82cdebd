"""A graph's operators as one native program (``csrc/tflite_program.cpp``): one call from Python
runs every operator's native kernel in order, with the same arguments the per-operator path passes
them, so the codes are the same. At batch 1 the per-operator path spent more time in Python and
array conversions (about 10 us per operator) than in the kernels.

A graph of one input converts when every operator has a native kernel taking its whole input: CONV_2D and
DEPTHWISE_CONV_2D (a PAD they apply themselves included), ADD of two same-shaped tensors, MEAN over
consecutive axes, FULLY_CONNECTED, QUANTIZE between int8 / int16 grids, RESHAPE. Any other operator
(or the native kernels unavailable) leaves the graph on its per-operator path.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixprec.integer.core.tensors import CODE_RANGES
from mixprec.integer.ops.conv import native_conv_arguments
from mixprec.integer.ops.conversions import RequantizeParams
from mixprec.integer.ops.mean import mean_shape
from mixprec.kernels import native

if TYPE_CHECKING:
    from mixprec.integer.graph.graph import Graph

_VALUE, _CONSTANT, _INT, _BOOL, _NONE, _DOUBLE = range(6)
_RESHAPE = -1


@dataclass(frozen=True)
class _Value:
    """A tensor of the program: one of the graph's inputs, then one per step, in order."""

    index: int


class _NotNative(Exception):
    """An operator without a native kernel for its whole input."""


class NativeProgram:
    """What :func:`native_program` builds: operator names, constants and the encoded steps."""

    def __init__(self, inputs: int, float_image: tuple[int, ...] | None = None) -> None:
        self.float_image = float_image  # (C, H, W) of the float NCHW images a float program takes
        self.inputs = inputs
        self.values = inputs
        self.ops: list[str] = []
        self.constants: list[torch.Tensor] = []
        self.steps: list[int] = []
        self._constant_index: dict[int, int] = {}

    def _argument(self, item: object) -> tuple[int, int]:
        if isinstance(item, _Value):
            return _VALUE, item.index
        if isinstance(item, torch.Tensor):
            if id(item) not in self._constant_index:
                self._constant_index[id(item)] = len(self.constants)
                self.constants.append(item)
            return _CONSTANT, self._constant_index[id(item)]
        if isinstance(item, (bool, np.bool_)):
            return _BOOL, int(item)
        if isinstance(item, (int, np.integer)):
            return _INT, int(item)
        if item is None:
            return _NONE, 0
        if isinstance(item, float):
            return _DOUBLE, struct.unpack("<q", struct.pack("<d", item))[0]
        raise TypeError(f"a program argument is a value, a tensor, an int, a bool, a float or None, got "
                        f"{type(item).__name__}")

    def _step(self, kind: int, arguments: tuple) -> _Value:
        self.steps += [kind, len(arguments)]
        for item in arguments:
            self.steps += self._argument(item)
        self.values += 1
        return _Value(self.values - 1)

    def call(self, operator: str, *arguments: object) -> _Value:
        """A step calling ``mixprec::operator`` with ``arguments``; its result is the returned value."""
        name = f"mixprec::{operator}"
        if name not in self.ops:
            self.ops.append(name)
        return self._step(self.ops.index(name), arguments)

    def reshape(self, value: _Value, *sizes: int) -> _Value:
        """A step viewing ``value`` with ``sizes`` (-1 for the batch)."""
        return self._step(_RESHAPE, (value, *sizes))

    @functools.cached_property
    def encoded(self) -> torch.Tensor:
        """The steps as an int64 tensor (passed without a conversion per call), made on the first call."""
        return torch.tensor(self.steps, dtype=torch.int64)

    @functools.cached_property
    def _decoded(self) -> object:
        """The program decoded once in C++ with its constants (:func:`native.tflite_program`), on the first call."""
        return native.tflite_program(self.inputs, self.constants, self.ops, self.encoded)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) == 1:
            return self._decoded.run_one(inputs[0])
        return self._decoded.run(list(inputs))


def native_program(graph: Graph, float_nchw: bool = False) -> NativeProgram | None:
    """``graph``'s operators as one native program, or None where an operator has no native kernel for
    its input (see module docstring) or the native kernels are not built.

    ``float_nchw``: the program takes float32 NCHW images, quantizes them onto the input's NHWC grid
    (``Quantization.nearest_codes``' codes) and returns the output dequantized to float32 (computed in
    double, rounded once); it needs per-tensor int8 / int16 input and output grids (else None)."""
    if not native.available() or len(graph.inputs) != 1:  # one input: every value shares its batch
        return None
    spec, output = graph.inputs[0], graph.output_quant
    if float_nchw and (spec.dtype not in ("int8", "int16") or len(spec.shape) != 4 or len(spec.quant.scale) != 1
                       or output is None or len(output.scale) != 1 or graph.tensor_dtypes[-1] not in ("int8", "int16")):
        return None
    program = NativeProgram(len(graph.inputs), (spec.shape[3], spec.shape[1], spec.shape[2]) if float_nchw else None)
    values: dict[int, _Value] = {i: _Value(i) for i in range(len(graph.inputs))}
    if float_nchw:
        values[0] = program.call("tflite_quantize_nchw", _Value(0), float(np.float32(spec.quant.scale[0])),
                                 int(spec.quant.zero_point[0]), spec.dtype == "int16")
    fusions = graph.pad_fusions
    applied = {conv: (pad, pads) for pad, (conv, pads) in fusions.items()}
    finishing = _finishing_adds(graph)
    finished = {add: conv for conv, (add, _, _) in finishing.items()}
    try:
        for index, (node, record) in enumerate(zip(graph.nodes, graph.records)):
            tensor = len(graph.inputs) + index
            if index in fusions:
                continue
            if index in finished:  # computed by its convolution
                values[tensor] = values[len(graph.inputs) + finished[index]]
                continue
            residual: tuple = ()
            if index in finishing:
                add, other, residual_first = finishing[index]
                add_record = graph.records[add]
                residual = (values[other], add_record.int8_table, add_record.int8_fit, residual_first)
            if index in applied or residual:  # a convolution that applies a PAD or finishes an ADD
                if index in applied:
                    pad, pads = applied[index]
                    source = graph.nodes[pad].inputs[0]
                    arguments = native_conv_arguments(record, graph.tensor_shapes[source],
                                                      graph.tensor_shapes[len(graph.inputs) + pad],
                                                      (pads[0][0], pads[1][0]))
                else:
                    source = node.inputs[0]
                    arguments = native_conv_arguments(record, graph.tensor_shapes[source])
                values[tensor] = program.call("tflite_conv2d", values[source], *arguments, *residual)
                continue
            inputs = [values[i] for i in node.inputs]
            shapes = [graph.tensor_shapes[i] for i in node.inputs]
            values[tensor] = _operator(program, node.opcode, record, inputs, shapes, graph.tensor_shapes[tensor],
                                       graph.tensor_dtypes[tensor])
    except _NotNative:
        return None
    if float_nchw:
        program.call("tflite_dequantize", values[len(graph.inputs) + len(graph.nodes) - 1],
                     float(np.float32(output.scale[0])), int(output.zero_point[0]))
    return program


def _finishing_adds(graph: Graph) -> dict[int, tuple[int, int, bool]]:
    """int8 ADDs that their convolution finishes (``csrc/tflite_conv.cpp``): per convolution node, the ADD's
    node, the other operand's tensor and whether that operand is the ADD's first. The convolution is the
    ADD's later operand (the other one exists when it runs), an int8 CONV_2D or DEPTHWISE_CONV_2D whose
    output only that ADD reads; both operands have one shape."""
    first_node = len(graph.inputs)
    readers: dict[int, int] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            readers[tensor] = readers.get(tensor, 0) + 1
    found: dict[int, tuple[int, int, bool]] = {}
    for index, node in enumerate(graph.nodes):
        if node.opcode != "ADD" or graph.records[index].dtype != "int8":
            continue
        a, b = node.inputs
        conv, other = max(a, b), min(a, b)
        if (a == b or conv < first_node or graph.tensor_shapes[a] != graph.tensor_shapes[b]
                or readers[conv] != 1 or conv - first_node in found or other - first_node in graph.pad_fusions):
            continue
        producer = graph.nodes[conv - first_node]
        if producer.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D") and graph.records[conv - first_node].dtype == "int8":
            found[conv - first_node] = (index, other, other == a)
    return found


def _operator(program: NativeProgram, opcode: str, record: object, inputs: list[_Value],
              shapes: list[tuple[int, ...]], shape: tuple[int, ...], dtype: str) -> _Value:
    """The steps of one operator (output ``shape`` and ``dtype``); raises _NotNative where there are none."""
    if opcode in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return program.call("tflite_conv2d", inputs[0], *native_conv_arguments(record, shapes[0]))
    if opcode == "ADD" and shapes[0] == shapes[1]:
        if record.dtype == "int8":
            return program.call("tflite_add_lookup", *inputs, record.int8_table, record.int8_fit)
        return program.call("tflite_add", *inputs, record.a_offset, record.b_offset, record.a_multiplier,
                            record.a_shift, record.b_multiplier, record.b_shift, record.output_multiplier,
                            record.output_shift, record.output_offset, record.activation_min, record.activation_max)
    if opcode == "MEAN" and record.axes == tuple(range(record.axes[0], record.axes[-1] + 1)):
        middle = int(np.prod([shapes[0][axis] for axis in record.axes]))
        inner = int(np.prod(shapes[0][record.axes[-1] + 1:]))
        grouped = program.reshape(inputs[0], -1, middle, inner)
        sums = program.call("tflite_mean_middle", grouped, record.input_zero_point * record.count, record.multiplier,
                            record.shift, record.output_zero_point, *CODE_RANGES[record.dtype])
        return program.reshape(sums, -1, *mean_shape(shapes[0], record.axes, record.keep_dims)[1:])
    if opcode == "FULLY_CONNECTED":
        rows = inputs[0] if len(shapes[0]) == 2 else program.reshape(inputs[0], -1, shapes[0][-1])
        weights, bias, multiplier, shift = record.native_constants
        out = program.call("tflite_fully_connected", rows, weights, bias, multiplier, shift, record.input_offset,
                           record.output_offset, record.activation_min, record.activation_max)
        return out if len(shape) == 2 else program.reshape(out, -1, *shape[1:])
    if opcode == "QUANTIZE" and isinstance(record, RequantizeParams):
        return program.call("tflite_requantize", inputs[0], record.input_offset, record.multiplier, record.shift,
                            record.output_offset, dtype == "int16")
    if opcode == "RESHAPE":
        return program.reshape(inputs[0], -1, *shape[1:])
    raise _NotNative(opcode)
