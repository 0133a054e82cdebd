"""Fixed-point primitives with the exact semantics of gemmlowp / TFLite's reference kernels.

All functions take and return numpy integer arrays (or scalars), vectorized elementwise
with broadcasting; arithmetic is done in int64 so no intermediate can overflow, and every
result that must fit int32 is checked or saturated as stated.

- :func:`saturating_rounding_doubling_high_mul` (gemmlowp ``SaturatingRoundingDoublingHighMul``):
  ``(a * b + nudge) / 2^31`` with C++ integer division (truncation toward zero), ``nudge``
  ``= 2^30`` for a non-negative product and ``1 - 2^30`` for a negative one: ``a * b / 2^31``
  rounded to nearest with ties toward +inf (1.5 -> 2, -1.5 -> -1); the single overflowing
  case ``a = b = -2^31`` saturates to ``2^31 - 1``.
- :func:`rounding_divide_by_pot` (gemmlowp ``RoundingDivideByPOT``): ``x / 2^e`` rounded to
  nearest, ties away from zero, for ``0 <= e <= 31``.
- :func:`multiply_by_quantized_multiplier` (TFLite ``MultiplyByQuantizedMultiplier``, the
  gemmlowp double-rounding form): ``RoundingDivideByPOT(SRDHM(x * 2^left, m), right)``
  with ``left = max(shift, 0)``, ``right = max(-shift, 0)``.
- :func:`multiply_by_quantized_multiplier_single_round` (TFLite's ``TFLITE_SINGLE_ROUNDING``
  form): ``(x * m + 2^(t - 1)) >> t`` with ``t = 31 - shift`` in 64 bits: one rounding,
  to nearest, ties toward +inf.
- :func:`multiply_by_quantized_multiplier_int64` (TFLite's ``int64_t`` overload, used by the
  16x8 kernels on int64 accumulators): the multiplier first reduced to 16 bits,
  ``r = (m + 2^15) >> 16`` (``2^15 - 1`` for ``m >= 0x7FFF0000``), then
  ``(x * r + 2^(t - 1)) >> t`` with ``t = 15 - shift``: ties toward +inf, for ``|x| < 2^47``
  and ``shift`` in ``[-31, 7]``; a result beyond int32 saturates (LiteRT's C++ would wrap).
  LiteRT's 16x8 convolutions round this way.
- :func:`multiply_by_quantized_multiplier_single_round_int64`: the single-rounding form with
  the full 31-bit multiplier on an int64 accumulator (``|x| < 2^47``), computed exactly
  (``x * m`` split so no intermediate leaves int64), the result saturated to int32. Measured
  against LiteRT ``BUILTIN_REF``: its 16x8 FULLY_CONNECTED rounds this way (0 of 600 outputs
  off; the reduced-multiplier form above missed 63), its 16x8 convolutions the reduced form (0
  off; this form missed 33,420 of 600,000).

LiteRT's reference kernels use both, so mixprec keeps both, named by what they do:
measured against ``ai-edge-litert`` 2.3 (``BUILTIN_REF``), int8 FULLY_CONNECTED matches
only the single-rounding form (the double form differed in 29 of 20,000 outputs), MUL
only the double-rounding form (the single form differed in 1,894 of 160,000), and ADD
both (0 of 160,000 either way; mixprec uses the double form there, as TFLite's source
does). They agree on overflow: where ``x * 2^left`` or the result leaves int32 both
saturate (LiteRT's C++ would wrap), and no supported op reaches that case.
- :func:`quantize_multiplier` (TFLite ``QuantizeMultiplier``): a real multiplier ``r >= 0``
  as ``m * 2^(shift - 31)`` with ``m`` in ``[2^30, 2^31)``, ``m = round(frac * 2^31)``
  (half away from zero) where ``r = frac * 2^shift``, ``frac`` in ``[0.5, 1)``. A ratio
  so small that ``shift < -31`` gives ``(0, 0)``: the product is exactly zero, never
  garbage; a ratio of ``2^31`` or more is refused.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mixprec.errors import InputError

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def _int64(x: ArrayLike) -> NDArray[np.int64]:
    return np.asarray(x).astype(np.int64)


def saturate_int32(x: ArrayLike) -> NDArray[np.int32]:
    """Clamp to ``[-2^31, 2^31 - 1]`` and convert to int32."""
    return np.clip(_int64(x), INT32_MIN, INT32_MAX).astype(np.int32)


def _divide_truncating(numerator: NDArray[np.int64], shift: int) -> NDArray[np.int64]:
    """``numerator / 2^shift`` rounded toward zero, as C++ integer division does."""
    return np.where(numerator >= 0, numerator >> shift, -((-numerator) >> shift))


def saturating_rounding_doubling_high_mul(a: ArrayLike, b: ArrayLike) -> NDArray[np.int32]:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` of int32 values (see module docstring)."""
    a64, b64 = _int64(a), _int64(b)
    product = a64 * b64
    nudge = np.where(product >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = _divide_truncating(product + nudge, 31)
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    return np.where(overflow, INT32_MAX, high).astype(np.int32)


def rounding_divide_by_pot(x: ArrayLike, exponent: ArrayLike) -> NDArray[np.int32]:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent``, nearest, ties away from zero."""
    x64, e64 = _int64(x), _int64(exponent)
    if np.any((e64 < 0) | (e64 > 31)):
        raise InputError(f"rounding_divide_by_pot needs 0 <= exponent <= 31, got {np.unique(e64)[:5]}")
    mask = (np.int64(1) << e64) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0)
    return ((x64 >> e64) + (remainder > threshold)).astype(np.int32)


def _check_rescale(x: ArrayLike, multiplier: ArrayLike, shift: ArrayLike) -> tuple[NDArray[np.int64], ...]:
    s64, m64, x64 = _int64(shift), _int64(multiplier), _int64(x)
    if np.any((s64 < -31) | (s64 > 30)):
        raise InputError(f"a multiplier shift must lie in [-31, 30], got {np.unique(s64)[:5]}")
    if np.any((m64 < 0) | (m64 > INT32_MAX)) or np.any((x64 < INT32_MIN) | (x64 > INT32_MAX)):
        raise InputError("multiplying by a quantized multiplier takes int32 x and a multiplier in [0, 2^31)")
    return x64, m64, s64


def multiply_by_quantized_multiplier(x: ArrayLike, multiplier: ArrayLike, shift: ArrayLike) -> NDArray[np.int32]:
    """Double-rounding ``MultiplyByQuantizedMultiplier`` of int32 ``x`` (see module docstring);
    ``multiplier`` in ``[0, 2^31)``, ``shift`` in ``[-31, 30]``."""
    x64, m64, s64 = _check_rescale(x, multiplier, shift)
    if np.all(s64 <= 0):  # the two roundings as one (below): the same integers in fewer passes
        return _rescale_right_folded(x64, m64, -s64)
    scaled = saturate_int32(x64 << np.maximum(s64, 0))
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(scaled, m64), np.maximum(-s64, 0))


def _rescale_right_folded(x64: NDArray[np.int64], m64: NDArray[np.int64],
                          right: NDArray[np.int64]) -> NDArray[np.int32]:
    """The double-rounding rescale for right shifts ``right`` >= 0 as one rounding of ``p = x * m``.
    With multipliers in ``[0, 2^31)`` the high multiply cannot overflow and equals ``q = floor((p + 2^30)
    / 2^31)``; ``RoundingDivideByPOT(q, R)`` is ``floor((q + h - [q < 0]) / 2^R)`` with ``h = 2^(R-1)``
    (0 and no sign term for ``R = 0``), and ``q < 0`` exactly when ``p < -2^30``. Nested floor divisions
    of integers compose: ``floor((p + 2^30 + (h - [p < -2^30]) 2^31) / 2^(31 + R))``, inside int64."""
    product = x64 * m64
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    correction = (half - ((product < -(1 << 30)) & (right > 0))) << 31
    return ((product + (1 << 30) + correction) >> (31 + right)).astype(np.int32)


def multiply_by_quantized_multiplier_single_round(x: ArrayLike, multiplier: ArrayLike,
                                                  shift: ArrayLike) -> NDArray[np.int32]:
    """Single-rounding ``MultiplyByQuantizedMultiplier`` of int32 ``x`` (see module docstring)."""
    x64, m64, s64 = _check_rescale(x, multiplier, shift)
    total = 31 - s64
    return saturate_int32((x64 * m64 + (np.int64(1) << (total - 1))) >> total)


def _check_wide_rescale(x: ArrayLike, multiplier: ArrayLike, shift: ArrayLike) -> tuple[NDArray[np.int64], ...]:
    x64, m64, s64 = _int64(x), _int64(multiplier), _int64(shift)
    if np.any((s64 < -31) | (s64 > 7)):
        raise InputError(f"a 16x8 multiplier shift must lie in [-31, 7], got {np.unique(s64)[:5]}")
    if np.any((m64 < 0) | (m64 > INT32_MAX)) or np.any((x64 < -(2**47)) | (x64 >= 2**47)):
        raise InputError("the int64 rescale takes |x| < 2^47 and a multiplier in [0, 2^31)")
    return x64, m64, s64


def multiply_by_quantized_multiplier_int64(x: ArrayLike, multiplier: ArrayLike,
                                           shift: ArrayLike) -> NDArray[np.int32]:
    """TFLite's ``MultiplyByQuantizedMultiplier`` of an int64 accumulator (see module docstring)."""
    x64, m64, s64 = _check_wide_rescale(x, multiplier, shift)
    reduced = np.where(m64 < 0x7FFF0000, (m64 + (1 << 15)) >> 16, np.int64(0x7FFF))
    total = 15 - s64
    return saturate_int32((x64 * reduced + (np.int64(1) << (total - 1))) >> total)


def multiply_by_quantized_multiplier_single_round_int64(x: ArrayLike, multiplier: ArrayLike,
                                                        shift: ArrayLike) -> NDArray[np.int32]:
    """Single-rounding rescale of an int64 accumulator with the full multiplier (see module
    docstring): ``floor((x * m + 2^(t - 1)) / 2^t)``, ``t = 31 - shift``, exact."""
    x64, m64, s64 = _check_wide_rescale(x, multiplier, shift)
    total = 31 - s64  # >= 24
    # x = high * 2^16 + low (0 <= low < 2^16): x*m + r = (high*m) * 2^16 + (low*m + r), each part in int64,
    # and floor(a / 2^t) = floor((high*m + floor((low*m + r) / 2^16)) / 2^(t - 16)) exactly.
    high, low = x64 >> 16, x64 & 0xFFFF
    partial = high * m64 + ((low * m64 + (np.int64(1) << (total - 1))) >> 16)
    return saturate_int32(partial >> (total - 16))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(multiplier, shift)`` with ``real ~= multiplier * 2^(shift - 31)`` (see module docstring)."""
    if not isinstance(real, (int, float)) or not math.isfinite(real) or real < 0:
        raise InputError(f"a real multiplier must be a finite number >= 0, got {real!r}")
    if real == 0:
        return 0, 0
    fraction, shift = math.frexp(real)
    multiplier = math.floor(fraction * 2**31 + 0.5)  # round half away from zero (fraction > 0)
    if multiplier == 2**31:
        multiplier //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise InputError(f"real multiplier {real!r} is 2^31 or more; no int32 fixed-point form exists")
    return multiplier, shift
