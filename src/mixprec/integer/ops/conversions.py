"""Conversions between float32 and affine int8, and between two int8 quantizations, with
LiteRT's reference semantics (``reference_ops::AffineQuantize``, ``Dequantize`` and
``Requantize``).

- quantize: ``q = clamp(round_half_away(float32(x) / float32(scale)) + zero_point, -128, 127)``,
  the division in float32. Infinities and values beyond the int32 range saturate; NaN is
  refused (LiteRT casts it to int32, which C++ leaves undefined).
- dequantize: ``float32(double(scale) * (q - zero_point))`` (the product is exact in double,
  so the result is the float32 nearest the true value, ties to even).
- requantize: ``clamp(MBQM(q - zp_in, multiplier, shift) + zp_out, -128, 127)`` with
  :func:`~mixprec.integer.fixedpoint.multiply_by_quantized_multiplier` (two roundings) and
  ``multiplier, shift = quantize_multiplier(double(s_in) / double(s_out))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier
from mixprec.integer.core.rounding import round_half_away
from mixprec.integer.core.tensors import require_array


@dataclass(frozen=True)
class RequantizeParams:
    """Runtime record of an int8 -> int8 requantization: integers only."""

    input_offset: int
    multiplier: int
    shift: int
    output_offset: int

    def __post_init__(self) -> None:
        if not -128 <= self.input_offset <= 127 + 128 or not -128 <= self.output_offset <= 127:
            raise InputError(f"offsets out of range: input {self.input_offset}, output {self.output_offset}")


def requantize_params(input_scale: float, input_zero_point: int, output_scale: float,
                      output_zero_point: int) -> RequantizeParams:
    """LiteRT's ``Prepare``: ``double(s_in) / double(s_out)`` through :func:`quantize_multiplier`."""
    multiplier, shift = quantize_multiplier(float(np.float32(input_scale)) / float(np.float32(output_scale)))
    return RequantizeParams(-int(input_zero_point), multiplier, shift, int(output_zero_point))


def requantize(q: NDArray[np.int8], params: RequantizeParams) -> NDArray[np.int8]:
    """int8 on one affine grid -> int8 on another (see module docstring)."""
    require_array("requantize", q, np.int8)
    scaled = multiply_by_quantized_multiplier(q.astype(np.int64) + params.input_offset, params.multiplier,
                                              params.shift).astype(np.int64)
    return np.clip(scaled + params.output_offset, -128, 127).astype(np.int8)


def quantize(x: NDArray[np.float32], scale: float, zero_point: int) -> NDArray[np.int8]:
    """float32 -> affine int8 (see module docstring)."""
    require_array("quantize", x, np.float32)
    if np.isnan(x).any():
        raise InputError(f"quantize got {int(np.isnan(x).sum())} NaN values; NaN has no int8 code")
    with np.errstate(over="ignore"):  # overflow gives +-inf, which saturates below
        rounded = round_half_away(x / np.float32(scale)).astype(np.float64)
    return np.clip(rounded + int(zero_point), -128, 127).astype(np.int8)


def dequantize(q: NDArray[np.int8], scale: float, zero_point: int) -> NDArray[np.float32]:
    """affine int8 -> float32 (see module docstring)."""
    require_array("dequantize", q, np.int8)
    return (float(np.float32(scale)) * (q.astype(np.float64) - int(zero_point))).astype(np.float32)
