"""Integer-only engine in TFLite int8 conventions (issue 4).

So far: the fixed-point primitives; int8 FULLY_CONNECTED (per-tensor and per-channel
weights, int32 bias, ReLU/ReLU6 in the clamp), ADD and MUL (unequal scales, broadcasting),
MEAN, RESHAPE, LOGISTIC and TANH (float32 tables), SOFTMAX (gemmlowp fixed point), QUANTIZE
(float32 -> int8 and int8 -> int8) and DEQUANTIZE; graphs over numbered tensors; .tflite
export and import. The tests run exported graphs in LiteRT's reference kernels and require
byte-identical outputs.
"""

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
    AddNode,
    DequantizeNode,
    FullyConnectedNode,
    LogisticNode,
    MeanNode,
    MulNode,
    QuantizeNode,
    ReshapeNode,
    SoftmaxNode,
    TanhNode,
)
from mixprec.integer.tensors import Quantization, TensorSpec, activation_range
from mixprec.integer.tflite_export import export_tflite
from mixprec.integer.tflite_import import load_tflite

__all__ = [
    "AddNode", "AddParams", "DequantizeNode", "FullyConnectedNode", "FullyConnectedParams", "Graph", "INT32_MAX",
    "INT32_MIN", "LogisticNode", "MeanNode", "MulNode", "MulParams", "Quantization", "QuantizeNode", "ReshapeNode",
    "SoftmaxNode", "TanhNode", "TensorSpec", "activation_range", "add", "export_tflite", "fully_connected",
    "load_tflite", "mul", "multiply_by_quantized_multiplier", "multiply_by_quantized_multiplier_single_round",
    "quantize_multiplier", "rounding_divide_by_pot", "saturate_int32", "saturating_rounding_doubling_high_mul",
]
