"""Fast compute paths, each with a slow reference beside it."""

from mixprec.kernels.activation_quant import (
    quantize_per_token_symmetric_torch,
    quantize_static,
    quantize_static_torch,
    rescale_accumulator,
    rescale_accumulator_torch,
)
from mixprec.kernels.int8_linear import (
    int8_linear_dynamic,
    int8_linear_dynamic_torch,
    int8_linear_packed,
    int8_linear_static,
    int8_linear_static_packed,
)
from mixprec.kernels.int8_matmul import KERNEL_NAME as INT8_MATMUL_KERNEL
from mixprec.kernels.int8_matmul import MAX_REDUCTION, int8_matmul, int8_matmul_reference

__all__ = [
    "INT8_MATMUL_KERNEL",
    "MAX_REDUCTION",
    "int8_linear_dynamic",
    "int8_linear_dynamic_torch",
    "int8_linear_packed",
    "int8_linear_static",
    "int8_linear_static_packed",
    "int8_matmul",
    "int8_matmul_reference",
    "quantize_per_token_symmetric_torch",
    "quantize_static",
    "quantize_static_torch",
    "rescale_accumulator",
    "rescale_accumulator_torch",
]
