"""Integer-only engine in TFLite int8 conventions, with half-precision islands.

Operators byte-identical to LiteRT's reference kernels: FULLY_CONNECTED (per-tensor and per-
channel weights, int32 bias, ReLU/ReLU6 in the clamp), CONV_2D and DEPTHWISE_CONV_2D,
AVERAGE_POOL_2D, MAX_POOL_2D, PAD, CONCATENATION, ADD and MUL (unequal scales, broadcasting),
MEAN, RESHAPE, LOGISTIC and TANH (float32 tables), SOFTMAX (gemmlowp fixed point), QUANTIZE,
DEQUANTIZE, EMBEDDING (TFLite's GATHER) and ADD_CONSTANT (positional encodings; TFLite's ADD);
beyond TFLite's builtins, LAYER_NORM, SOFTMAX_ATTENTION and LINEAR_ATTENTION in integers.
TFLite's 16x8 mode (int16 activations with zero point 0, int8 weights, int64 biases) for
FULLY_CONNECTED, the convolutions, pooling, PAD, RESHAPE, CONCATENATION, ADD, MUL, MEAN,
SOFTMAX, LOGISTIC and TANH (LiteRT's interpolated sigmoid table), with QUANTIZE between int8
and int16 so one graph mixes both per operator.

The layers, each importing only from those above it:

- :mod:`~mixprec.integer.core`: rounding rules, fixed-point arithmetic, tensor quantization.
- :mod:`~mixprec.integer.ops`: the operator kernels, pure functions over numpy arrays.
- :mod:`~mixprec.integer.graph`: nodes, graphs over numbered tensors, exact simulation.
- :mod:`~mixprec.integer.tflite`: .tflite export and import.
- :mod:`~mixprec.integer.half`: float16 / bfloat16 islands, bridges to int8, pipelines.
- :mod:`~mixprec.integer.build`: graphs from float PyTorch modules plus calibration data.
- :mod:`~mixprec.integer.models`: the keyword spotter and encoder topologies of the examples.
"""

from mixprec.integer.core.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_round,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturate_int32,
    saturating_rounding_doubling_high_mul,
)
from mixprec.integer.core.tensors import Quantization, TensorSpec, activation_range
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
    LayerNormNode,
    LinearAttentionNode,
    LogisticNode,
    MaxPool2DNode,
    MeanNode,
    MulNode,
    PadNode,
    QuantizeNode,
    ReshapeNode,
    SoftmaxAttentionNode,
    SoftmaxNode,
    TanhNode,
)
from mixprec.integer.graph.simulate import operator_errors, rounding_attribution, simulate
from mixprec.integer.half.pipeline import AttentionPoolStage, IntegerStage, Pipeline, ToHalfStage, ToInt8Stage
from mixprec.integer.ops.conv import ConvParams, conv2d
from mixprec.integer.ops.elementwise import AddParams, MulParams, add, mul
from mixprec.integer.ops.fully_connected import FullyConnectedParams, fully_connected
from mixprec.integer.tflite.export import export_tflite
from mixprec.integer.tflite.load import load_tflite

__all__ = [
    "AddConstantNode", "AttentionPoolStage", "EmbeddingNode", "IntegerStage", "LayerNormNode", "LinearAttentionNode",
    "Pipeline", "SoftmaxAttentionNode", "ToHalfStage", "ToInt8Stage", "operator_errors", "rounding_attribution",
    "simulate",
    "AddNode", "AddParams", "AveragePool2DNode", "MaxPool2DNode", "PadNode", "ConcatenationNode", "Conv2DNode",
    "ConvParams",
    "DepthwiseConv2DNode", "DequantizeNode", "FullyConnectedNode",
    "FullyConnectedParams", "Graph", "INT32_MAX",
    "INT32_MIN", "LogisticNode", "MeanNode", "MulNode", "MulParams", "Quantization", "QuantizeNode", "ReshapeNode",
    "SoftmaxNode", "TanhNode", "TensorSpec", "activation_range", "add", "export_tflite", "fully_connected",
    "conv2d", "load_tflite", "mul", "multiply_by_quantized_multiplier", "multiply_by_quantized_multiplier_single_round",
    "quantize_multiplier", "rounding_divide_by_pot", "saturate_int32", "saturating_rounding_doubling_high_mul",
]
