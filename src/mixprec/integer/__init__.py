"""Integer-only engine in TFLite int8 conventions (issue 4).

So far: the fixed-point primitives, the int8 fully connected operator (per-tensor and
per-channel weights, int32 bias, ReLU/ReLU6 in the clamp), graphs that chain them, and
.tflite export; the tests run exported graphs in LiteRT's reference kernels and require
byte-identical outputs.
"""

from mixprec.integer.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturate_int32,
    saturating_rounding_doubling_high_mul,
)
from mixprec.integer.fully_connected import FullyConnectedParams, fully_connected
from mixprec.integer.graph import FullyConnectedNode, Graph, Quantization, activation_range
from mixprec.integer.tflite_export import export_tflite

__all__ = [
    "INT32_MAX", "INT32_MIN", "FullyConnectedNode", "FullyConnectedParams", "Graph", "Quantization",
    "activation_range", "export_tflite", "fully_connected", "multiply_by_quantized_multiplier",
    "quantize_multiplier", "rounding_divide_by_pot", "saturate_int32", "saturating_rounding_doubling_high_mul",
]
