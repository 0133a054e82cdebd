"""Bridges between affine int8 and the half-precision islands (float16, or bfloat16 as uint16
bit patterns, see :mod:`mixprec.integer.half.formats`), and between Qm.n fixed point and affine int8.

- int8 -> half: the real value ``scale * (q - zero_point)`` is exact in float64 (a float32
  times a 9-bit integer; 17 bits for int16 codes), then rounded once to the half format
  (nearest, ties to even).
- half -> int8: ``q = clamp(round_half_even(x / scale) + zero_point, -128, 127)`` (int16 codes,
  TFLite's 16x8 activations: zero point 0, clamped to ``[-32768, 32767]``). The float64
  quotient cannot land on a false tie (``x`` has at most 11 significant bits and ``scale`` 24,
  so a true quotient off a tie differs from it by far more than float64's rounding). Rules
  for non-finite inputs: +inf -> 127, -inf -> -128 (saturating, like every other overflow);
  NaN is refused with an error naming how many there are.
- Qm.n <-> affine: a Qm.n int8 code ``c`` means ``c * 2^-n`` (``m + n = 7``, sign bit apart),
  i.e. the affine grid ``scale = 2^-n, zero_point = 0``; converting either way is the integer
  requantization of :mod:`mixprec.integer.ops.conversions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.tensors import CODE_RANGES, Quantization, check_code_grid, require_array
from mixprec.integer.half.formats import (
    HalfArray,
    bfloat16_to_float32,
    half_format,
    round_to_format,
    to_bfloat16,
    to_float16,
)
from mixprec.integer.ops.conversions import requantize, requantize_params


def int8_to_half_table(quant: Quantization, dtype: str, codes: str = "int8") -> NDArray[np.float32]:
    """The half values of every code of ``codes`` (int8: -128..127, index ``code + 128``; int16:
    index ``code + 32768``) under ``quant``, as float32."""
    _check_per_tensor(quant)
    low, high = CODE_RANGES[codes]
    return round_to_format(quant.values_of(np.arange(low, high + 1)), dtype).astype(np.float32)


def int8_to_half(q: NDArray[np.int8], quant: Quantization, dtype: str = "float16") -> HalfArray:
    """Affine int8 -> ``dtype`` (float16 array, or bfloat16 bits in uint16), see module docstring."""
    _check_per_tensor(quant)
    half_format(dtype)
    require_array("int8_to_half", q, np.int8)
    real = quant.values_of(q)
    return to_float16(real) if dtype == "float16" else to_bfloat16(real)


def half_to_int8(x: NDArray, quant: Quantization) -> NDArray[np.int8]:
    """float16 values, or bfloat16 bits in uint16 -> affine int8 (see module docstring)."""
    _check_per_tensor(quant)
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float16, np.uint16):
        raise InputError("half_to_int8 takes float16 values or bfloat16 bit patterns (uint16), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    return half_values_to_int8(x.astype(np.float32) if x.dtype == np.float16 else bfloat16_to_float32(x), quant)


def half_values_to_int8(x: NDArray[np.float32], quant: Quantization, codes: str = "int8") -> NDArray:
    """:func:`half_to_int8` of half values held in float32 (the islands' working form); int16
    codes when ``codes="int16"``."""
    _check_per_tensor(quant)
    check_code_grid(codes, quant, "the half -> integer bridge")
    real = np.asarray(x, dtype=np.float64)
    nan = int(np.isnan(real).sum())
    if nan:
        raise InputError(f"{nan} NaN values reached the half -> {codes} bridge; NaN has no {codes} code "
                         "(find where the half-precision island produced them)")
    return quant.nearest_codes(real, codes)


@dataclass(frozen=True)
class QFormat:
    """Signed 8-bit Qm.n: ``integer_bits + fraction_bits == 7``; code ``c`` means ``c * 2^-fraction_bits``."""

    integer_bits: int
    fraction_bits: int

    def __post_init__(self) -> None:
        if self.integer_bits < 0 or self.fraction_bits < 0 or self.integer_bits + self.fraction_bits != 7:
            raise InputError(f"Q{self.integer_bits}.{self.fraction_bits} is not an 8-bit signed format: "
                             "integer and fraction bits must be non-negative and add up to 7")

    @property
    def quantization(self) -> Quantization:
        """The same grid as affine parameters: ``scale = 2^-n``, zero point 0."""
        return Quantization.per_tensor(2.0 ** -self.fraction_bits, 0)


def qformat_to_affine(codes: NDArray[np.int8], fmt: QFormat, quant: Quantization) -> NDArray[np.int8]:
    """Qm.n codes -> affine int8 on ``quant`` (integer requantization; saturating)."""
    _check_per_tensor(quant)
    source = fmt.quantization
    return requantize(codes, requantize_params(source.scale[0], 0, quant.scale[0], quant.zero_point[0]))


def affine_to_qformat(q: NDArray[np.int8], quant: Quantization, fmt: QFormat) -> NDArray[np.int8]:
    """Affine int8 on ``quant`` -> Qm.n codes (integer requantization; saturating)."""
    _check_per_tensor(quant)
    target = fmt.quantization
    return requantize(q, requantize_params(quant.scale[0], quant.zero_point[0], target.scale[0], 0))


def _check_per_tensor(quant: Quantization) -> None:
    if not isinstance(quant, Quantization) or len(quant.scale) != 1:
        raise InputError(f"bridges take one per-tensor Quantization, got {quant!r}")
