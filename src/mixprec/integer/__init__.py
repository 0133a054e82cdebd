"""Integer-only engine in TFLite int8 conventions, with half-precision islands.

- Graphs of int8 operators over numbered tensors: FULLY_CONNECTED (per-tensor and
  per-channel weights, int32 bias, ReLU/ReLU6 in the clamp), ADD and MUL (unequal scales,
  broadcasting), MEAN, RESHAPE, LOGISTIC and TANH (float32 tables), SOFTMAX (gemmlowp fixed
  point), QUANTIZE, DEQUANTIZE, EMBEDDING (TFLite's GATHER) and ADD_CONSTANT (positional
  encodings; TFLite's ADD): byte-identical to LiteRT's reference kernels, exported to and
  imported from .tflite. Beyond TFLite's builtins: LAYER_NORM, SOFTMAX_ATTENTION and
  LINEAR_ATTENTION in integers.
- Bridges between int8 and float16/bfloat16 (:mod:`~mixprec.integer.bridges`), island
  operators (:mod:`~mixprec.integer.half_ops`) and pipelines joining them
  (:mod:`~mixprec.integer.pipeline`); builders from float modules plus calibration data
  (:mod:`~mixprec.integer.builders`); the keyword spotter (:mod:`~mixprec.integer.kws`) and
  encoder (:mod:`~mixprec.integer.encoder`) topologies; exact-arithmetic simulation of a
  graph (:mod:`~mixprec.integer.simulate`).
"""

from mixprec.integer.conv import ConvParams, conv2d
from mixprec.integer.elementwise import AddParams, MulParams, add, mul
from mixprec.integer.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_round,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturate_int32,
    saturating_rounding_doubling_high_mul,
)
from mixprec.integer.fully_connected import FullyConnectedParams, fully_connected
from mixprec.integer.graph import Graph
from mixprec.integer.nodes import (
    AddConstantNode,
    AddNode,
    AveragePool2DNode,
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
from mixprec.integer.pipeline import AttentionPoolStage, IntegerStage, Pipeline, ToHalfStage, ToInt8Stage
from mixprec.integer.simulate import operator_errors, rounding_attribution, simulate
from mixprec.integer.tensors import Quantization, TensorSpec, activation_range
from mixprec.integer.tflite_export import export_tflite
from mixprec.integer.tflite_import import load_tflite

__all__ = [
    "AddConstantNode", "AttentionPoolStage", "EmbeddingNode", "IntegerStage", "LayerNormNode", "LinearAttentionNode",
    "Pipeline", "SoftmaxAttentionNode", "ToHalfStage", "ToInt8Stage", "operator_errors", "rounding_attribution",
    "simulate",
    "AddNode", "AddParams", "AveragePool2DNode", "MaxPool2DNode", "PadNode", "Conv2DNode", "ConvParams",
    "DepthwiseConv2DNode", "DequantizeNode", "FullyConnectedNode",
    "FullyConnectedParams", "Graph", "INT32_MAX",
    "INT32_MIN", "LogisticNode", "MeanNode", "MulNode", "MulParams", "Quantization", "QuantizeNode", "ReshapeNode",
    "SoftmaxNode", "TanhNode", "TensorSpec", "activation_range", "add", "export_tflite", "fully_connected",
    "conv2d", "load_tflite", "mul", "multiply_by_quantized_multiplier", "multiply_by_quantized_multiplier_single_round",
    "quantize_multiplier", "rounding_divide_by_pot", "saturate_int32", "saturating_rounding_doubling_high_mul",
]
