"""Conversions between float32 and affine int8 / int16, and between two quantizations (int8 or
int16 on either side), with LiteRT's reference semantics (``reference_ops::AffineQuantize``,
``Dequantize`` and ``Requantize``). ``[lo, hi]`` is the output type's code range.

- quantize: ``q = clamp(round_half_away(float32(x) / float32(scale)) + zero_point, lo, hi)``,
  the division in float32. Infinities and values beyond the int32 range saturate; NaN is
  refused (LiteRT casts it to int32, which C++ leaves undefined).
- dequantize: ``float32(double(scale) * (q - zero_point))`` (the product is exact in double,
  so the result is the float32 nearest the true value, ties to even).
- requantize: ``clamp(MBQM(q - zp_in, multiplier, shift) + zp_out, lo, hi)`` with
  :func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier` (two roundings) and
  ``multiplier, shift = quantize_multiplier(double(s_in) / double(s_out))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier
from mixprec.integer.core.rounding import round_half_away
from mixprec.integer.core.tensors import CODE_RANGES, require_array, require_codes
from mixprec.kernels import native


@dataclass(frozen=True)
class RequantizeParams:
    """Runtime record of a requantization between int8 / int16 grids: integers only."""

    input_offset: int
    multiplier: int
    shift: int
    output_offset: int
    input_dtype: str = "int8"
    output_dtype: str = "int8"

    def __post_init__(self) -> None:
        if self.input_dtype not in CODE_RANGES or self.output_dtype not in CODE_RANGES:
            raise InputError(f"requantization runs between int8 and int16, got {self.input_dtype!r} -> "
                             f"{self.output_dtype!r}")
        (in_low, in_high), (out_low, out_high) = CODE_RANGES[self.input_dtype], CODE_RANGES[self.output_dtype]
        if not -in_high <= self.input_offset <= -in_low or not out_low <= self.output_offset <= out_high:
            raise InputError(f"offsets out of range: input {self.input_offset}, output {self.output_offset}")
        if not 0 <= self.multiplier < 2**31 or not -31 <= self.shift <= 30:
            raise InputError(f"a requantization multiplier lies in [0, 2^31) with a shift in [-31, 30], got "
                             f"{self.multiplier} and {self.shift}")


def requantize_params(input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int,
                      input_dtype: str = "int8", output_dtype: str = "int8") -> RequantizeParams:
    """LiteRT's ``Prepare``: ``double(s_in) / double(s_out)`` through :func:`quantize_multiplier`."""
    multiplier, shift = quantize_multiplier(float(np.float32(input_scale)) / float(np.float32(output_scale)))
    return RequantizeParams(-int(input_zero_point), multiplier, shift, int(output_zero_point), input_dtype,
                            output_dtype)


def requantize(q: NDArray, params: RequantizeParams) -> NDArray:
    """int8 / int16 on one affine grid -> the record's output type on another (see module docstring): by
    mixprec's native kernel (``csrc/tflite_requantize.cpp``) when it is built, else by
    :func:`requantize_reference`."""
    require_array("requantize", q, np.dtype(params.input_dtype).type)
    if native.available():
        codes = native.tflite_requantize(torch.from_numpy(np.ascontiguousarray(q)), params.input_offset,
                                         params.multiplier, params.shift, params.output_offset,
                                         params.output_dtype == "int16")
        return codes.numpy()
    return requantize_reference(q, params)


def requantize_reference(q: NDArray, params: RequantizeParams) -> NDArray:
    """The numpy statement of :func:`requantize`, which the native kernel is pinned to."""
    require_array("requantize", q, np.dtype(params.input_dtype).type)
    scaled = multiply_by_quantized_multiplier(q.astype(np.int64) + params.input_offset, params.multiplier,
                                              params.shift).astype(np.int64)
    return np.clip(scaled + params.output_offset, *CODE_RANGES[params.output_dtype]).astype(params.output_dtype)


def quantize(x: NDArray[np.float32], scale: float, zero_point: int, dtype: str = "int8") -> NDArray:
    """float32 -> affine int8 or int16 (``dtype``; see module docstring)."""
    require_array("quantize", x, np.float32)
    if dtype not in CODE_RANGES:
        raise InputError(f"quantize writes int8 or int16 codes, got {dtype!r}")
    if np.isnan(x).any():
        raise InputError(f"quantize got {int(np.isnan(x).sum())} NaN values; NaN has no {dtype} code")
    with np.errstate(over="ignore"):  # overflow gives +-inf, which saturates below
        rounded = round_half_away(x / np.float32(scale)).astype(np.float64)
    return np.clip(rounded + int(zero_point), *CODE_RANGES[dtype]).astype(dtype)


def dequantize(q: NDArray, scale: float, zero_point: int) -> NDArray[np.float32]:
    """affine int8 or int16 -> float32 (see module docstring)."""
    require_codes("dequantize", q)
    return (float(np.float32(scale)) * (q.astype(np.float64) - int(zero_point))).astype(np.float32)
