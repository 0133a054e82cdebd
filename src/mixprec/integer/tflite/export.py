"""Write an integer :class:`~mixprec.integer.graph.graph.Graph` as a .tflite file (schema version
3) through the flatbuffers builders of the ``tflite`` package; TensorFlow is not needed.

Layout: buffer 0 is the empty sentinel; every tensor has its own buffer (empty for
activations); constant data is stored little-endian. Tensors carry their scales and
zero points (``quantized_dimension`` 0 for per-channel weights and biases); bias scales
are ``float32(s_in * s_w)`` as the TFLite converter writes them.
"""

from __future__ import annotations

import os

import numpy as np

from mixprec.errors import InputError
from mixprec.integer.core.tensors import Quantization
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import (
    AddConstantNode,
    Conv2DNode,
    DepthwiseConv2DNode,
    EmbeddingNode,
    FullyConnectedNode,
    MeanNode,
    PadNode,
    ReshapeNode,
)
from mixprec.io_utils import atomic_path

ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 3}  # tflite.ActivationFunctionType
_OPTIONS = {"FULLY_CONNECTED": "FullyConnectedOptions", "ADD": "AddOptions", "MUL": "MulOptions",
            "SOFTMAX": "SoftmaxOptions", "MEAN": "ReducerOptions", "LOGISTIC": None, "TANH": None,
            "RESHAPE": None, "QUANTIZE": None, "DEQUANTIZE": None, "EMBEDDING": "GatherOptions",
            "ADD_CONSTANT": "AddOptions", "CONV_2D": "Conv2DOptions",
            "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "AVERAGE_POOL_2D": "Pool2DOptions",
            "MAX_POOL_2D": "Pool2DOptions", "PAD": None, "CONCATENATION": "ConcatenationOptions"}
#: mixprec operators written as a TFLite builtin of another name.
BUILTIN_OF = {"EMBEDDING": "GATHER", "ADD_CONSTANT": "ADD"}
#: Operator versions that cover int8 (and per-channel FULLY_CONNECTED).
_VERSIONS = {"FULLY_CONNECTED": 5, "ADD": 2, "MUL": 2, "SOFTMAX": 2, "LOGISTIC": 2, "TANH": 2, "MEAN": 2,
             "RESHAPE": 1, "QUANTIZE": 2, "DEQUANTIZE": 2, "GATHER": 3, "CONV_2D": 3, "DEPTHWISE_CONV_2D": 3,
             "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "PAD": 2, "CONCATENATION": 2}


def require_tflite():  # noqa: ANN202
    """The ``flatbuffers`` and ``tflite`` modules, or an InputError saying how to install them."""
    try:
        import flatbuffers
        import tflite
    except ImportError:
        raise InputError("exporting .tflite needs the tflite and flatbuffers packages: "
                         "pip install 'mixprec[tflite]'") from None
    return flatbuffers, tflite


def export_tflite(graph: Graph, path: str | os.PathLike[str]) -> None:
    """Write ``graph`` to ``path`` (atomically)."""
    if not isinstance(graph, Graph):
        raise InputError(f"export_tflite takes a mixprec.integer.Graph, got {type(graph).__name__}")
    unsupported = sorted({node.opcode for node in graph.nodes if node.opcode not in _OPTIONS})
    if unsupported:
        raise InputError(f"{', '.join(unsupported)} has no TFLite builtin operator; export_tflite writes "
                         f"{', '.join(sorted(_OPTIONS))}")
    flatbuffers, tflite = require_tflite()
    builder = flatbuffers.Builder(1024)
    tensors: list[tuple[str, tuple[int, ...], int, Quantization | None, bytes | None]] = []  # name, shape, ...

    def add(name: str, shape: tuple[int, ...], dtype: int, quant: Quantization | None, data: bytes | None) -> int:
        tensors.append((name, shape, dtype, quant, data))
        return len(tensors) - 1

    int8, int32 = tflite.TensorType.INT8, tflite.TensorType.INT32
    types = {"int8": int8, "int16": tflite.TensorType.INT16, "float32": tflite.TensorType.FLOAT32, "int32": int32,
             "int64": tflite.TensorType.INT64}
    position = [add(spec.name, spec.shape, types[spec.dtype], spec.quant, None) for spec in graph.inputs]
    opcodes: list[str] = []
    operators = []
    shapes, quants, dtypes = graph.tensor_shapes, graph.tensor_quants, graph.tensor_dtypes
    for index, node in enumerate(graph.nodes):
        inputs = [position[i] for i in node.inputs]
        if isinstance(node, (FullyConnectedNode, Conv2DNode, DepthwiseConv2DNode)):
            inputs.append(add(f"op{index}/weights", node.weights.shape, int8, node.weight_quant,
                              node.weights.astype("<i1").tobytes()))
            if node.bias is not None:
                s_in = quants[node.inputs[0]].scale32[0]
                bias_scale = tuple(float(np.float32(s_in * s)) for s in node.weight_quant.scale32)
                little_endian = node.bias.dtype.newbyteorder("<")
                inputs.append(add(f"op{index}/bias", node.bias.shape, types[node.bias.dtype.name],
                                  Quantization(bias_scale, (0,) * len(bias_scale)),
                                  node.bias.astype(little_endian).tobytes()))
        elif isinstance(node, PadNode):
            paddings = np.asarray(node.paddings, dtype="<i4")
            inputs.append(add(f"op{index}/paddings", paddings.shape, int32, None, paddings.tobytes()))
        elif isinstance(node, MeanNode):
            axes = np.asarray(sorted(node.axes), dtype="<i4")
            inputs.append(add(f"op{index}/axes", axes.shape, int32, None, axes.tobytes()))
        elif isinstance(node, EmbeddingNode):  # GATHER(params, indices)
            inputs.insert(0, add(f"op{index}/table", node.table.shape, int8, node.table_quant,
                                 node.table.astype("<i1").tobytes()))
        elif isinstance(node, AddConstantNode):
            inputs.append(add(f"op{index}/constant", node.constant.shape, int8, node.constant_quant,
                              node.constant.astype("<i1").tobytes()))
        elif isinstance(node, ReshapeNode):
            new_shape = np.asarray((-1, *node.shape), dtype="<i4")  # -1: the batch stays free
            inputs.append(add(f"op{index}/shape", new_shape.shape, int32, None, new_shape.tobytes()))
        output_index = len(graph.inputs) + index
        position.append(add(f"op{index}/{node.opcode.lower()}", shapes[output_index], types[dtypes[output_index]],
                            quants[output_index], None))
        builtin = BUILTIN_OF.get(node.opcode, node.opcode)
        if builtin not in opcodes:
            opcodes.append(builtin)
        operators.append((opcodes.index(builtin), node, inputs, [position[-1]]))

    # Buffers: 0 is the sentinel, tensor i uses buffer i + 1.
    buffer_offsets = []
    for data in [None] + [t[4] for t in tensors]:
        vector = builder.CreateByteVector(data) if data else None
        tflite.BufferStart(builder)
        if vector is not None:
            tflite.BufferAddData(builder, vector)
        buffer_offsets.append(tflite.BufferEnd(builder))
    tensor_offsets = []
    for index, (name, tensor_shape, dtype, tensor_quant, _) in enumerate(tensors):
        name_offset = builder.CreateString(name)
        shape_offset = _int_vector(builder, tflite.TensorStartShapeVector, tensor_shape, builder.PrependInt32)
        quant_offset = _quantization(builder, tflite, tensor_quant) if tensor_quant is not None else None
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape_offset)
        tflite.TensorAddType(builder, dtype)
        tflite.TensorAddBuffer(builder, index + 1)
        tflite.TensorAddName(builder, name_offset)
        if quant_offset is not None:
            tflite.TensorAddQuantization(builder, quant_offset)
        tensor_offsets.append(tflite.TensorEnd(builder))
    operator_offsets = []
    for opcode_index, node, inputs, outputs in operators:
        inputs_offset = _int_vector(builder, tflite.OperatorStartInputsVector, inputs, builder.PrependInt32)
        outputs_offset = _int_vector(builder, tflite.OperatorStartOutputsVector, outputs, builder.PrependInt32)
        options_name = _OPTIONS[node.opcode]
        options = _options(builder, tflite, options_name, node, shapes[node.inputs[0]]) if options_name else None
        tflite.OperatorStart(builder)
        tflite.OperatorAddOpcodeIndex(builder, opcode_index)
        tflite.OperatorAddInputs(builder, inputs_offset)
        tflite.OperatorAddOutputs(builder, outputs_offset)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(builder, getattr(tflite.BuiltinOptions, options_name))
            tflite.OperatorAddBuiltinOptions(builder, options)
        operator_offsets.append(tflite.OperatorEnd(builder))
    tensors_vector = _offset_vector(builder, tflite.SubGraphStartTensorsVector, tensor_offsets)
    operators_vector = _offset_vector(builder, tflite.SubGraphStartOperatorsVector, operator_offsets)
    sub_inputs = _int_vector(builder, tflite.SubGraphStartInputsVector, position[:len(graph.inputs)],
                             builder.PrependInt32)
    sub_outputs = _int_vector(builder, tflite.SubGraphStartOutputsVector, [position[-1]], builder.PrependInt32)
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors_vector)
    tflite.SubGraphAddInputs(builder, sub_inputs)
    tflite.SubGraphAddOutputs(builder, sub_outputs)
    tflite.SubGraphAddOperators(builder, operators_vector)
    subgraph = tflite.SubGraphEnd(builder)
    opcode_offsets = []
    for opcode in opcodes:
        code = getattr(tflite.BuiltinOperator, opcode)
        tflite.OperatorCodeStart(builder)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, code)
        tflite.OperatorCodeAddBuiltinCode(builder, code)
        tflite.OperatorCodeAddVersion(builder, _VERSIONS[opcode])
        opcode_offsets.append(tflite.OperatorCodeEnd(builder))
    opcodes_vector = _offset_vector(builder, tflite.ModelStartOperatorCodesVector, opcode_offsets)
    subgraphs_vector = _offset_vector(builder, tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_vector = _offset_vector(builder, tflite.ModelStartBuffersVector, buffer_offsets)
    description = builder.CreateString("mixprec integer graph")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, opcodes_vector)
    tflite.ModelAddSubgraphs(builder, subgraphs_vector)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffers_vector)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=b"TFL3")
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(builder.Output()))


def _options(builder, tflite, name: str, node, input_shape: tuple[int, ...]) -> int:  # noqa: ANN001
    getattr(tflite, f"{name}Start")(builder)
    if name == "SoftmaxOptions":
        tflite.SoftmaxOptionsAddBeta(builder, float(node.beta))
    elif name == "ReducerOptions":
        tflite.ReducerOptionsAddKeepDims(builder, bool(node.keep_dims))
    elif name == "ConcatenationOptions":
        tflite.ConcatenationOptionsAddAxis(builder, int(node.axis))
    elif name == "GatherOptions":
        tflite.GatherOptionsAddAxis(builder, 0)
    elif name == "Pool2DOptions":
        tflite.Pool2DOptionsAddPadding(builder, getattr(tflite.Padding, node.padding))
        tflite.Pool2DOptionsAddStrideH(builder, node.stride[0])
        tflite.Pool2DOptionsAddStrideW(builder, node.stride[1])
        tflite.Pool2DOptionsAddFilterHeight(builder, node.filter[0])
        tflite.Pool2DOptionsAddFilterWidth(builder, node.filter[1])
        tflite.Pool2DOptionsAddFusedActivationFunction(builder, ACTIVATION_CODES[node.activation])
    elif name in ("Conv2DOptions", "DepthwiseConv2DOptions"):
        getattr(tflite, f"{name}AddPadding")(builder, getattr(tflite.Padding, node.padding))
        getattr(tflite, f"{name}AddStrideH")(builder, node.stride[0])
        getattr(tflite, f"{name}AddStrideW")(builder, node.stride[1])
        getattr(tflite, f"{name}AddDilationHFactor")(builder, node.dilation[0])
        getattr(tflite, f"{name}AddDilationWFactor")(builder, node.dilation[1])
        getattr(tflite, f"{name}AddFusedActivationFunction")(builder, ACTIVATION_CODES[node.activation])
        if name == "DepthwiseConv2DOptions":
            tflite.DepthwiseConv2DOptionsAddDepthMultiplier(builder, node.weights.shape[3] // input_shape[3])
    else:
        activation = getattr(node, "activation", "none")
        getattr(tflite, f"{name}AddFusedActivationFunction")(builder, ACTIVATION_CODES[activation])
        if name == "AddOptions":  # the general-scale 16x8 ADD (the schema's default is the power-of-two one)
            tflite.AddOptionsAddPotScaleInt16(builder, False)
    return getattr(tflite, f"{name}End")(builder)


def _int_vector(builder, start, values, prepend) -> int:  # noqa: ANN001
    """A vector of numbers (ints, or floats when ``prepend`` is PrependFloat32)."""
    start(builder, len(values))
    for value in reversed(list(values)):
        prepend(value)
    return builder.EndVector()


def _offset_vector(builder, start, offsets) -> int:  # noqa: ANN001
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _quantization(builder, tflite, quant: Quantization) -> int:  # noqa: ANN001
    scale = _int_vector(builder, tflite.QuantizationParametersStartScaleVector, quant.scale, builder.PrependFloat32)
    zero_point = _int_vector(builder, tflite.QuantizationParametersStartZeroPointVector, quant.zero_point,
                             builder.PrependInt64)
    tflite.QuantizationParametersStart(builder)
    tflite.QuantizationParametersAddScale(builder, scale)
    tflite.QuantizationParametersAddZeroPoint(builder, zero_point)
    tflite.QuantizationParametersAddQuantizedDimension(builder, quant.axis)
    return tflite.QuantizationParametersEnd(builder)
