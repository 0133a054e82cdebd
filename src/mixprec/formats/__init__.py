"""Numbers only: quantization schemes and parameters, rounding, half storage, int4 packing."""

from mixprec.formats.affine import (
    SCALE_MIN,
    QParams,
    dequantize,
    fake_quantize,
    integer_dtype,
    minmax,
    param_shape,
    qparams_from_range,
    qparams_from_tensor,
    quantize,
    slice_view,
)
from mixprec.formats.finite import all_finite, count_infinite
from mixprec.formats.half import FP16_SCALE_MIN, HALF_DTYPES, HalfConversion, fp16_scale, half_dtype, to_half
from mixprec.formats.int4 import pack_int4, unpack_int4
from mixprec.formats.spec import QuantSpec

__all__ = [
    "all_finite",
    "count_infinite",
    "FP16_SCALE_MIN",
    "HALF_DTYPES",
    "SCALE_MIN",
    "HalfConversion",
    "QParams",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "fp16_scale",
    "half_dtype",
    "integer_dtype",
    "minmax",
    "pack_int4",
    "param_shape",
    "qparams_from_range",
    "qparams_from_tensor",
    "quantize",
    "slice_view",
    "to_half",
    "unpack_int4",
]
