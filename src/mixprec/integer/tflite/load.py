"""Read an int8 or 16x8 .tflite file into a :class:`~mixprec.integer.graph.graph.Graph` (the ``tflite``
package's flatbuffers readers; no TensorFlow).

Supported: one subgraph of int8 tensors with FULLY_CONNECTED (int8 weights, optional int32
bias), CONV_2D and DEPTHWISE_CONV_2D (likewise), AVERAGE_POOL_2D, MAX_POOL_2D, PAD, ADD (of two
tensors, or of a tensor and an int8 constant), MUL, MEAN (constant axes), CONCATENATION (of
graph tensors on one grid), RESHAPE (a constant target with the batch first, -1 or 1, or
without it, one -1 allowed; or the converter's dynamic-batch SHAPE -> STRIDED_SLICE -> PACK
arithmetic, folded), EXPAND_DIMS and SQUEEZE away from the batch (read as RESHAPE), LOGISTIC,
TANH, SOFTMAX, QUANTIZE (float32 or int8 input), DEQUANTIZE (float32 output) and GATHER (an
int8 constant table on axis 0, int32 ids: an embedding), in the file's operator order, with a
single output produced by the last operator. TFLite's 16x8 mode: FULLY_CONNECTED and the
convolutions (int64 or int32 bias), the pools, PAD, CONCATENATION, the reshapes, MEAN, MUL,
SOFTMAX, LOGISTIC, TANH (all three on the ``1/32768, 0`` output grid) and ADD (its general-scale
form, ``pot_scale_int16 = false``) on int16 tensors too, QUANTIZE between float32, int8 and
int16, DEQUANTIZE of int16. Graph inputs are int8, int16, float32 or int32 (ids). Anything else
is refused by name; a file that is not a complete .tflite flatbuffer is refused before anything
is built.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mixprec.errors import InputError
from mixprec.integer.core.tensors import Quantization, TensorSpec
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import (
    AddConstantNode,
    AddNode,
    AveragePool2DNode,
    ConcatenationNode,
    Conv2DNode,
    DepthwiseConv2DNode,
    DequantizeNode,
    EmbeddingNode,
    FullyConnectedNode,
    LogisticNode,
    MaxPool2DNode,
    MeanNode,
    MulNode,
    PadNode,
    QuantizeNode,
    ReshapeNode,
    SoftmaxNode,
    TanhNode,
)
from mixprec.integer.ops.activations import FIXED_OUTPUT
from mixprec.integer.ops.sigmoid16 import SIGMOID16_OUTPUT
from mixprec.integer.tflite.export import ACTIVATION_CODES, require_tflite

#: int32 shape arithmetic the converter writes for a dynamic-batch reshape (Keras Flatten):
#: SHAPE -> STRIDED_SLICE (the batch) -> PACK (batch, sizes...) -> RESHAPE; folded at import.
_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK")
#: Operators that only relabel the dimensions, read as RESHAPE (the bytes do not change).
_RESHAPES = ("RESHAPE", "EXPAND_DIMS", "SQUEEZE")
SUPPORTED = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D", "ADD", "MUL", "MEAN",
             "PAD", "CONCATENATION", "LOGISTIC", "TANH", "SOFTMAX", "QUANTIZE", "DEQUANTIZE", "GATHER", *_RESHAPES,
             *_SHAPE_OPS)
_CONVOLUTIONS = {"CONV_2D": Conv2DNode, "DEPTHWISE_CONV_2D": DepthwiseConv2DNode}
_POOLS = {"AVERAGE_POOL_2D": AveragePool2DNode, "MAX_POOL_2D": MaxPool2DNode}
#: Element types per opcode: (input types accepted, output types; None: the input's type).
_TYPES = {"QUANTIZE": (("INT8", "INT16", "FLOAT32"), ("INT8", "INT16")),
          "DEQUANTIZE": (("INT8", "INT16"), ("FLOAT32",)),
          **{name: (("INT8", "INT16"), None) for name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D",
                                                          "AVERAGE_POOL_2D", "MAX_POOL_2D", "PAD", "CONCATENATION",
                                                          "ADD", "MUL", "MEAN", "SOFTMAX", "LOGISTIC", "TANH",
                                                          *_RESHAPES)}}
_KINDS = {"INT8": "int8", "INT16": "int16", "FLOAT32": "float32", "INT32": "int32"}


def load_tflite(path: str | os.PathLike[str]) -> Graph:
    """The integer graph of an int8 .tflite file (see module docstring)."""
    _, tflite = require_tflite()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc}") from None
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InputError(f"{str(path)!r} is not a .tflite file (no TFL3 identifier)")
    try:
        return _build(tflite, tflite.Model.GetRootAs(data, 0), path)
    except InputError:
        raise
    except (IndexError, ValueError, TypeError, AttributeError, OverflowError, struct.error) as exc:
        raise InputError(f"{str(path)!r} is truncated or corrupt: {type(exc).__name__}: {exc}") from None


def _shape_arithmetic(name: str, op_index: int, operator: Any, op_inputs: list[int], symbolic: dict[int, object],
                      position: dict[int, int], constant: Any, is_constant: Any, tflite: Any) -> object:
    """The folded value of one shape operator: ``"shape"`` of a graph tensor, its ``"batch"``, or
    a reshape target ``(-1, sizes...)``; anything else is refused by name."""
    refuse = InputError(f"operator {op_index} ({name}) computes a shape mixprec cannot fold; it reads the "
                        "SHAPE -> STRIDED_SLICE -> PACK pattern of a dynamic-batch reshape")
    if name == "SHAPE":
        if op_inputs[0] not in position:
            raise refuse
        return "shape"
    options = operator.BuiltinOptions()
    if name == "STRIDED_SLICE":
        holder = tflite.StridedSliceOptions()
        if options is not None:
            holder.Init(options.Bytes, options.Pos)
        slices = [tuple(int(v) for v in constant(i, "<i4").reshape(-1)) for i in op_inputs[1:4]]
        if symbolic.get(op_inputs[0]) != "shape" or slices != [(0,), (1,), (1,)] or holder.ShrinkAxisMask() != 1:
            raise refuse
        return "batch"
    holder = tflite.PackOptions()
    if options is not None:
        holder.Init(options.Bytes, options.Pos)
    if holder.Axis() != 0 or symbolic.get(op_inputs[0]) != "batch" or not all(is_constant(i) for i in op_inputs[1:]):
        raise refuse
    return (-1, *(int(constant(i, "<i4").reshape(-1)[0]) for i in op_inputs[1:]))


def _convolution(name: str, options: Any, op_index: int, reads: tuple[int, ...], subgraph: Any, op_inputs: list[int],
                 constant: Any, tensor_type: Any, quantization: Any, output_quant: Quantization,
                 activation: str) -> Any:
    """A CONV_2D / DEPTHWISE_CONV_2D node from its operator (options already read into ``options``)."""
    padding = {0: "SAME", 1: "VALID"}.get(options.Padding())
    if padding is None:
        raise InputError(f"operator {op_index} ({name}) has padding code {options.Padding()}; mixprec reads SAME "
                         "and VALID")
    weights, bias = _weights_and_bias(op_inputs, constant, tensor_type)
    if name == "DEPTHWISE_CONV_2D":
        channels = _dims(subgraph.Tensors(op_inputs[0]))[-1]
        if weights.shape[3] != channels * options.DepthMultiplier():
            raise InputError(f"operator {op_index} (DEPTHWISE_CONV_2D) has {weights.shape[3]} output channels for "
                             f"{channels} inputs and depth multiplier {options.DepthMultiplier()}")
    return _CONVOLUTIONS[name](reads, weights, quantization(op_inputs[1]), bias, output_quant, padding,
                               (options.StrideH(), options.StrideW()),
                               (options.DilationHFactor(), options.DilationWFactor()), activation)


def _weights_and_bias(op_inputs: list[int], constant: Any, tensor_type: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A layer's int8 weights and its bias (int32, or int64 in 16x8 files), None when absent."""
    weights = constant(op_inputs[1], "<i1").astype(np.int8)
    if len(op_inputs) < 3 or op_inputs[2] < 0:
        return weights, None
    return weights, constant(op_inputs[2], "<i8" if tensor_type(op_inputs[2]) == "INT64" else "<i4")


def _reshape_target(name: str, op_index: int, operator: Any, op_inputs: list[int], symbolic: dict[int, object],
                    constant: Any, in_dims: tuple[int, ...], out_dims: tuple[int, ...], tflite: Any) -> tuple[int, ...]:
    """The non-batch sizes a RESHAPE / EXPAND_DIMS / SQUEEZE gives, as the converter writes them:
    RESHAPE's target from folded shape arithmetic or a constant, with the batch first (-1 or
    1) or without it, one -1 allowed among the sizes; EXPAND_DIMS and SQUEEZE (not on the batch)
    take the output's declared sizes."""
    per_example = int(np.prod(in_dims[1:]))
    if name != "RESHAPE":
        options = operator.BuiltinOptions()
        if name == "SQUEEZE":
            holder = tflite.SqueezeOptions()
            if options is not None:
                holder.Init(options.Bytes, options.Pos)
            dims = holder.SqueezeDimsAsNumpy() if holder.SqueezeDimsLength() else []
            touches_batch = len(dims) == 0 or any(int(d) in (0, -len(in_dims)) for d in dims)
        else:
            axis = int(constant(op_inputs[1], "<i4").reshape(-1)[0])
            touches_batch = axis in (0, -len(in_dims) - 1)
        if touches_batch or int(np.prod(out_dims[1:])) != per_example:
            raise InputError(f"operator {op_index} ({name}) reshapes the batch dimension; mixprec keeps the batch "
                             "first and free")
        return out_dims[1:]
    if len(op_inputs) < 2:
        raise InputError(f"operator {op_index} (RESHAPE) has no shape tensor; mixprec reads that form only")
    if op_inputs[1] in symbolic:  # (-1, sizes...) from folded shape arithmetic
        target = symbolic[op_inputs[1]]
        if not isinstance(target, tuple):
            raise InputError(f"operator {op_index} (RESHAPE) takes its shape from {target!r}; mixprec folds only "
                             "(batch, sizes...) packs")
    else:
        target = tuple(int(d) for d in constant(op_inputs[1], "<i4").reshape(-1))
    for sizes in ((target[1:],) if target[:1] in ((-1,), (1,)) else ()) + (target,):
        known = int(np.prod([d for d in sizes if d != -1]))
        if sizes and sizes.count(-1) <= 1 and min(sizes) >= -1 and known > 0 and per_example % known == 0 and \
                (-1 in sizes or known == per_example):
            return tuple(per_example // known if d == -1 else d for d in sizes)
    raise InputError(f"operator {op_index} (RESHAPE) has shape {target} for {in_dims[1:]} per batch element; mixprec "
                     "reads shapes that keep the batch first (or leave it out) and give the other sizes")


def _dims(tensor: Any) -> tuple[int, ...]:
    """A tensor's shape; ``()`` for a scalar (the reader gives 0 for an empty shape vector)."""
    shape = tensor.ShapeAsNumpy()
    return () if isinstance(shape, int) else tuple(int(d) for d in shape)


def _names(enum: Any) -> dict[int, str]:
    return {value: name for name, value in vars(enum).items() if not name.startswith("_")}


def _build(tflite: Any, model: Any, path: str | os.PathLike[str]) -> Graph:
    if model.SubgraphsLength() != 1:
        raise InputError(f"{str(path)!r} has {model.SubgraphsLength()} subgraphs; mixprec reads exactly one")
    subgraph = model.Subgraphs(0)
    op_names = _names(tflite.BuiltinOperator)
    type_names = _names(tflite.TensorType)
    activation_names = {code: name for name, code in ACTIVATION_CODES.items()}

    def quantization(index: int) -> Quantization:
        tensor = subgraph.Tensors(index)
        q = tensor.Quantization()
        if q is None or q.ScaleLength() == 0:
            raise InputError(f"tensor {tensor.Name().decode()!r} has no quantization parameters")
        return Quantization(tuple(float(v) for v in q.ScaleAsNumpy()), tuple(int(v) for v in q.ZeroPointAsNumpy()),
                            q.QuantizedDimension())

    def constant(index: int, dtype: str) -> np.ndarray:
        tensor = subgraph.Tensors(index)
        raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
        shape = _dims(tensor)
        if isinstance(raw, int) or raw.size != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise InputError(f"constant tensor {tensor.Name().decode()!r} holds no data of shape {shape}")
        return raw.view(dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))

    def tensor_type(index: int) -> str:
        return type_names.get(subgraph.Tensors(index).Type(), "UNKNOWN")

    inputs = [int(i) for i in subgraph.InputsAsNumpy()]
    position = {}
    specs = []
    for number, index in enumerate(inputs):
        kind = _KINDS.get(tensor_type(index))
        if kind is None:
            raise InputError(f"input {number} is {tensor_type(index)}; mixprec's engine takes int8, int16, float32 or "
                             "int32 inputs")
        tensor = subgraph.Tensors(index)
        specs.append(TensorSpec(tensor.Name().decode(), _dims(tensor),
                                quantization(index) if kind in ("int8", "int16") else None, kind))
        position[index] = number

    def is_constant(index: int) -> bool:
        raw = model.Buffers(subgraph.Tensors(index).Buffer()).DataAsNumpy()
        return not isinstance(raw, int) and raw.size > 0
    nodes = []
    symbolic: dict[int, object] = {}  # int32 tensors of folded shape arithmetic
    for op_index in range(subgraph.OperatorsLength()):
        operator = subgraph.Operators(op_index)
        code = model.OperatorCodes(operator.OpcodeIndex())
        name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        if name not in SUPPORTED:
            raise InputError(f"operator {op_index} is {name}, which mixprec's integer engine does not support "
                             f"(supported: {', '.join(SUPPORTED)})")
        op_inputs = [int(i) for i in operator.InputsAsNumpy()]
        (output,) = [int(i) for i in operator.OutputsAsNumpy()]
        if name in _SHAPE_OPS:
            symbolic[output] = _shape_arithmetic(name, op_index, operator, op_inputs, symbolic, position, constant,
                                                 is_constant, tflite)
            continue
        accepted, produced = _TYPES.get(name, (("INT8",), ("INT8",)))
        source = tensor_type(op_inputs[0])
        if tensor_type(output) not in (produced or (source,)) or source not in accepted:
            supported = " or ".join(accepted) + " to " + (" or ".join(produced) if produced else "the same type")
            raise InputError(f"operator {op_index} ({name}) maps {tensor_type(op_inputs[0])} to "
                             f"{tensor_type(output)}; mixprec supports {supported}")
        options = operator.BuiltinOptions()
        activation = "none"
        if name in ("FULLY_CONNECTED", "ADD", "MUL", "CONCATENATION", *_CONVOLUTIONS, *_POOLS):
            holder = {"FULLY_CONNECTED": tflite.FullyConnectedOptions, "ADD": tflite.AddOptions,
                      "MUL": tflite.MulOptions, "CONV_2D": tflite.Conv2DOptions,
                      "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions, "AVERAGE_POOL_2D": tflite.Pool2DOptions,
                      "MAX_POOL_2D": tflite.Pool2DOptions, "CONCATENATION": tflite.ConcatenationOptions}[name]()
            if options is not None:
                holder.Init(options.Bytes, options.Pos)
                code_value = holder.FusedActivationFunction()
                if code_value not in activation_names:
                    raise InputError(f"operator {op_index} ({name}) has an unsupported fused activation {code_value}")
                activation = activation_names[code_value]
        read = [i for i in op_inputs if i >= 0 and not is_constant(i) and i not in symbolic]
        missing = [i for i in read if i not in position]
        if missing:
            raise InputError(f"operator {op_index} ({name}) reads tensor {missing[0]} before anything produces it")
        if name == "FULLY_CONNECTED":
            weights, bias = _weights_and_bias(op_inputs, constant, tensor_type)
            node = FullyConnectedNode((position[op_inputs[0]],), weights, quantization(op_inputs[1]), bias,
                                      quantization(output), activation)
        elif name in _CONVOLUTIONS:
            node = _convolution(name, holder, op_index, (position[op_inputs[0]],), subgraph, op_inputs,
                                constant, tensor_type, quantization, quantization(output), activation)
        elif name in _POOLS:
            if quantization(output) != quantization(op_inputs[0]):
                raise InputError(f"operator {op_index} ({name}) changes the quantization; LiteRT's int8 pooling "
                                 "keeps the input's scale and zero point")
            padding = {0: "SAME", 1: "VALID"}.get(holder.Padding())
            if padding is None:
                raise InputError(f"operator {op_index} ({name}) has padding code {holder.Padding()}; mixprec reads "
                                 "SAME and VALID")
            node = _POOLS[name]((position[op_inputs[0]],), (holder.FilterHeight(), holder.FilterWidth()),
                                (holder.StrideH(), holder.StrideW()), padding, activation)
        elif name == "MEAN":
            holder = tflite.ReducerOptions()
            if options is not None:
                holder.Init(options.Bytes, options.Pos)
            axes = tuple(int(a) for a in constant(op_inputs[1], "<i4").reshape(-1))
            node = MeanNode((position[op_inputs[0]],), axes, quantization(output), bool(holder.KeepDims()))
        elif name in _RESHAPES:
            node = ReshapeNode((position[op_inputs[0]],), _reshape_target(
                name, op_index, operator, op_inputs, symbolic, constant, _dims(subgraph.Tensors(op_inputs[0])),
                _dims(subgraph.Tensors(output)), tflite))
        elif name == "CONCATENATION":
            if activation != "none" or any(is_constant(i) for i in op_inputs):
                raise InputError(f"operator {op_index} (CONCATENATION) joins a constant or fuses an activation; "
                                 "mixprec reads the concatenation of graph tensors")
            node = ConcatenationNode(tuple(position[i] for i in op_inputs), int(holder.Axis()))
        elif name == "PAD":
            if quantization(output) != quantization(op_inputs[0]):
                raise InputError(f"operator {op_index} (PAD) changes the quantization; mixprec reads PAD that keeps it")
            pairs = constant(op_inputs[1], "<i4").reshape(-1, 2)
            node = PadNode((position[op_inputs[0]],), tuple((int(a), int(b)) for a, b in pairs))
        elif name == "QUANTIZE":
            node = QuantizeNode((position[op_inputs[0]],), quantization(output), _KINDS[tensor_type(output)])
        elif name == "DEQUANTIZE":
            node = DequantizeNode((position[op_inputs[0]],))
        elif name == "GATHER":
            holder = tflite.GatherOptions()
            if options is not None:
                holder.Init(options.Bytes, options.Pos)
            if holder.Axis() != 0 or holder.BatchDims() != 0 or not is_constant(op_inputs[0]) or \
                    tensor_type(op_inputs[1]) != "INT32":
                raise InputError(f"operator {op_index} (GATHER) is not an embedding lookup; mixprec reads an int8 "
                                 "constant table gathered on axis 0 by int32 ids")
            node = EmbeddingNode((position[op_inputs[1]],), constant(op_inputs[0], "<i1").astype(np.int8),
                                 quantization(op_inputs[0]))
        elif name == "ADD" and any(is_constant(i) for i in op_inputs):
            if activation != "none" or is_constant(op_inputs[0]):
                raise InputError(f"operator {op_index} (ADD) adds a constant first or with a fused activation; "
                                 "mixprec reads tensor + constant without one")
            node = AddConstantNode((position[op_inputs[0]],), constant(op_inputs[1], "<i1").astype(np.int8),
                                   quantization(op_inputs[1]), quantization(output))
        elif name in ("ADD", "MUL"):
            if name == "ADD" and tensor_type(output) == "INT16" and (options is None or holder.PotScaleInt16()):
                raise InputError(f"operator {op_index} (ADD) is the power-of-two-scale int16 ADD; mixprec reads the "
                                 "general-scale 16x8 ADD (pot_scale_int16 = false) that TensorFlow's converter writes")
            node_class = AddNode if name == "ADD" else MulNode
            node = node_class((position[op_inputs[0]], position[op_inputs[1]]), quantization(output), activation)
        else:
            wide = tensor_type(output) == "INT16"
            fixed = Quantization.per_tensor(*(SIGMOID16_OUTPUT if wide else FIXED_OUTPUT[name]))
            if quantization(output) != fixed:
                raise InputError(f"operator {op_index} ({name}) has output quantization {quantization(output)}; its "
                                 f"{'int16' if wide else 'int8'} kernel requires scale {fixed.scale[0]} and zero "
                                 f"point {fixed.zero_point[0]}")
            if name == "SOFTMAX":
                holder = tflite.SoftmaxOptions()
                holder.Init(options.Bytes, options.Pos)
                node = SoftmaxNode((position[op_inputs[0]],), float(holder.Beta()))
            else:
                node = (LogisticNode if name == "LOGISTIC" else TanhNode)((position[op_inputs[0]],))
        nodes.append(node)
        position[output] = len(specs) + len(nodes) - 1
    outputs = [int(i) for i in subgraph.OutputsAsNumpy()]
    if len(outputs) != 1 or position.get(outputs[0]) != len(specs) + len(nodes) - 1:
        raise InputError("mixprec reads graphs with one output, produced by the last operator")
    return Graph(tuple(specs), tuple(nodes))
