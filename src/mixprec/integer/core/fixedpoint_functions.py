"""gemmlowp's fixed-point transcendental functions on raw int32 values (Q formats), with the
exact operation order of ``fixedpoint.h``; vectorized over numpy arrays.

A value with ``k`` integer bits is a raw int32 ``r`` meaning ``r / 2^(31 - k)``. Products
of values with ``a`` and ``b`` integer bits have ``a + b`` integer bits and raw
``SaturatingRoundingDoublingHighMul(ra, rb)``; sums and differences add raws (wrapping as
int32); ``Rescale`` from ``a`` to ``b`` integer bits is
:func:`saturating_rounding_multiply_by_pot` by ``a - b``. The constants are gemmlowp's raw
values (for example ``exp(-1/8)`` in Q0.31 is 1895147668).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mixprec.integer.core.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

#: exp(-2^k) in Q0.31 for k = -2 .. 4: the barrel shifter of ``exp_on_negative_values``.
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401),
               (4, 242))
_EXP_MINUS_ONE_EIGHTH = 1895147668  # exp(-1/8), Q0.31
_ONE_THIRD = 715827883  # 1/3, Q0.31
_48_OVER_17 = 1515870810  # Q2.29
_NEG_32_OVER_17 = -1010580540  # Q2.29


def wrap_int32(x: ArrayLike) -> NDArray[np.int64]:
    """Two's-complement wrap to the int32 range (what C++ int32 addition does), kept as int64."""
    return ((np.asarray(x, dtype=np.int64) - INT32_MIN) % 2**32) + INT32_MIN


def _mul(a: ArrayLike, b: ArrayLike) -> NDArray[np.int64]:
    return saturating_rounding_doubling_high_mul(a, b).astype(np.int64)


def saturating_rounding_multiply_by_pot(x: ArrayLike, exponent: int) -> NDArray[np.int64]:
    """gemmlowp ``SaturatingRoundingMultiplyByPOT<exponent>``: ``x * 2^exponent``, saturating
    for ``exponent > 0``, :func:`rounding_divide_by_pot` for ``exponent < 0``."""
    x64 = np.asarray(x, dtype=np.int64)
    if exponent == 0:
        return x64
    if exponent < 0:
        return rounding_divide_by_pot(x64, -exponent).astype(np.int64)
    threshold = (1 << (31 - exponent)) - 1
    shifted = x64 << exponent
    return np.where(x64 > threshold, INT32_MAX, np.where(x64 < -threshold, INT32_MIN, shifted))


def rounding_half_sum(a: ArrayLike, b: ArrayLike) -> NDArray[np.int64]:
    """gemmlowp ``RoundingHalfSum`` for int32: ``(a + b + sign(a + b)) / 2`` truncating (C++)."""
    total = np.asarray(a, dtype=np.int64) + np.asarray(b, dtype=np.int64)
    numerator = total + np.where(total >= 0, 1, -1)
    return np.where(numerator >= 0, numerator // 2, -((-numerator) // 2))


def _exp_on_quarter_interval(a: NDArray[np.int64]) -> NDArray[np.int64]:
    """``exp(a)`` for ``a`` in ``[-1/4, 0)``, Q0.31 in and out: Taylor series around -1/8."""
    x = wrap_int32(a + (1 << 28))  # a + 1/8
    x2 = _mul(x, x)
    x3 = _mul(x2, x)
    x4 = _mul(x2, x2)
    x4_over_4 = saturating_rounding_multiply_by_pot(x4, -2)
    series = saturating_rounding_multiply_by_pot(wrap_int32(_mul(wrap_int32(x4_over_4 + x3), _ONE_THIRD) + x2), -1)
    return wrap_int32(_EXP_MINUS_ONE_EIGHTH + _mul(_EXP_MINUS_ONE_EIGHTH, wrap_int32(x + series)))


def exp_on_negative_values(a: ArrayLike, integer_bits: int) -> NDArray[np.int64]:
    """gemmlowp ``exp_on_negative_values``: ``exp(a)`` for ``a <= 0`` with ``integer_bits``
    integer bits (1..5 here), result in Q0.31 (``exp(0)`` gives ``2^31 - 1``)."""
    if not 1 <= integer_bits <= 5:
        raise ValueError(f"exp_on_negative_values supports 1 to 5 integer bits, got {integer_bits}")
    a64 = np.asarray(a, dtype=np.int64)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    mod_minus_quarter = wrap_int32((a64 & (one_quarter - 1)) - one_quarter)
    result = _exp_on_quarter_interval(saturating_rounding_multiply_by_pot(mod_minus_quarter, integer_bits))
    remainder = wrap_int32(mod_minus_quarter - a64)
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = 1 << (fractional_bits + exponent)
            result = np.where(remainder & bit, _mul(result, multiplier), result)
    return np.where(a64 == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a: ArrayLike) -> NDArray[np.int64]:
    """gemmlowp ``one_over_one_plus_x_for_x_in_0_1``: ``1 / (1 + a)`` for Q0.31 ``a`` in
    ``[0, 1)``, by three Newton-Raphson steps in Q2.29; result Q0.31."""
    half_denominator = rounding_half_sum(a, INT32_MAX)
    x = wrap_int32(_48_OVER_17 + _mul(half_denominator, _NEG_32_OVER_17))
    one_q2 = 1 << 29
    for _ in range(3):
        one_minus = wrap_int32(one_q2 - _mul(half_denominator, x))
        x = wrap_int32(x + saturating_rounding_multiply_by_pot(_mul(x, one_minus), 2))
    return saturating_rounding_multiply_by_pot(x, 1)  # ExactMulByPot<-1> then Rescale<0>


def count_leading_zeros(x: ArrayLike) -> NDArray[np.int64]:
    """Leading zero bits of each value as uint32 (32 for 0)."""
    x64 = np.asarray(x, dtype=np.int64) & 0xFFFFFFFF
    bits = np.zeros_like(x64)
    for shift in range(32):
        bits = np.where(x64 >= (1 << shift), shift + 1, bits)
    return 32 - bits


def reciprocal(x: ArrayLike, integer_bits: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """TFLite ``GetReciprocal``: for positive ``x`` with ``integer_bits`` integer bits, the
    Q0.31 raw of ``2^n / x`` and ``n`` (``num_bits_over_unit``)."""
    x64 = np.asarray(x, dtype=np.int64)
    headroom_plus_one = count_leading_zeros(x64)
    bits_over_unit = integer_bits - headroom_plus_one
    shifted_minus_one = wrap_int32(((x64 << headroom_plus_one) & 0xFFFFFFFF) - (1 << 31))
    return one_over_one_plus_x_for_x_in_0_1(shifted_minus_one), bits_over_unit
