"""Int8 LOGISTIC, TANH and SOFTMAX with the semantics of LiteRT's reference kernels.

LOGISTIC and TANH build a table from float32 arithmetic once (at ``Prepare``) and then
only look up; SOFTMAX is gemmlowp fixed point throughout (integer parameters computed
from the scale in double).

- LOGISTIC / TANH: a 256-entry int8 table. For each input code ``q``:
  ``x = float32(s_in * (q - zp_in))``, ``y = f(x)`` in float32 (``1 / (1 + expf(-x))`` or
  ``tanhf(x)``), ``code = int(round(y * float32(1 / s_out)) + zp_out)`` with ``round``
  half away from zero, then clamped to int8.
- SOFTMAX (last axis, ``beta``): see :func:`softmax`.

``expf`` and ``tanhf`` come from the C math library (as LiteRT's), so the tables match
bit for bit rather than within numpy's own float32 approximations. The output
quantization is fixed by the op: LOGISTIC and SOFTMAX ``1/256, -128``, TANH ``1/128, 0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import (
    INT32_MAX,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from mixprec.integer.core.fixedpoint_functions import exp_on_negative_values, reciprocal, wrap_int32
from mixprec.integer.core.rounding import round_half_away

#: Output quantization each op requires: (scale, zero point).
FIXED_OUTPUT = {"LOGISTIC": (1.0 / 256, -128), "TANH": (1.0 / 128, 0), "SOFTMAX": (1.0 / 256, -128)}


@cache
def _libm() -> ctypes.CDLL:
    library = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name in ("expf", "tanhf"):
        function = getattr(library, name)
        function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float]
    return library


def _c_float_function(name: str, values: NDArray[np.float32]) -> NDArray[np.float32]:
    function = getattr(_libm(), name)
    return np.array([function(float(v)) for v in values], dtype=np.float32)


def lookup_table(kind: str, input_scale: float, input_zero_point: int) -> NDArray[np.int8]:
    """The 256-entry int8 table of LOGISTIC or TANH, indexed by ``code + 128``."""
    if kind not in ("LOGISTIC", "TANH"):
        raise InputError(f"lookup tables exist for LOGISTIC and TANH, not {kind!r}")
    codes = np.arange(-128, 128, dtype=np.int32)
    x = (np.float32(input_scale) * (codes - input_zero_point).astype(np.float32)).astype(np.float32)
    if kind == "LOGISTIC":
        y = (np.float32(1) / (np.float32(1) + _c_float_function("expf", -x))).astype(np.float32)
    else:
        y = _c_float_function("tanhf", x)
    out_scale, out_zero_point = FIXED_OUTPUT[kind]
    rescaled = round_half_away((y * (np.float32(1) / np.float32(out_scale))).astype(np.float32))
    quantized = (rescaled + np.float32(out_zero_point)).astype(np.int64)
    return np.clip(quantized, -128, 127).astype(np.int8)


@dataclass(frozen=True, eq=False)
class TableParams:
    """Runtime record of LOGISTIC/TANH: the int8 table, indexed by ``code + 128``."""

    table: NDArray[np.int8]

    def __post_init__(self) -> None:
        if self.table.dtype != np.int8 or self.table.shape != (256,):
            raise InputError(f"a lookup table is int8 [256], got {self.table.dtype} {self.table.shape}")


def apply_table(x: NDArray[np.int8], params: TableParams) -> NDArray[np.int8]:
    if not isinstance(x, np.ndarray) or x.dtype != np.int8:
        raise InputError(f"lookup takes an int8 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    return params.table[x.astype(np.int16) + 128]


#: Integer bits of the scaled input differences (Q5.26) and of the sum of exponentials (Q12.19).
SCALED_DIFF_INTEGER_BITS = 5
ACCUMULATION_INTEGER_BITS = 12


@dataclass(frozen=True)
class SoftmaxParams:
    """Runtime record of SOFTMAX: integers only. Differences from the row maximum are
    scaled by ``multiplier * 2^left_shift`` into Q5.26; those below ``diff_min`` give 0."""

    multiplier: int
    left_shift: int
    diff_min: int

    def __post_init__(self) -> None:
        if not 0 <= self.left_shift <= 31 or not 0 < self.multiplier <= INT32_MAX or self.diff_min > 0:
            raise InputError(f"invalid softmax record {self}")


def softmax_params(input_scale: float, beta: float) -> SoftmaxParams:
    """TFLite ``PreprocessSoftmaxScaling`` + ``CalculateInputRadius`` (in double):
    ``real = min(beta * s_in * 2^26, 2^31 - 1)``, quantized (it must exceed 1), and
    ``diff_min = -floor(31 * 2^26 / 2^left_shift)``."""
    if not np.isfinite(beta) or beta <= 0:
        raise InputError(f"softmax beta must be a positive finite number, got {beta!r}")
    real = min(float(np.float32(beta)) * float(np.float32(input_scale)) * 2.0 ** (31 - SCALED_DIFF_INTEGER_BITS),
               2.0**31 - 1.0)
    if real <= 1.0:
        raise InputError(f"softmax input scale {input_scale} x beta {beta} is too small: the int8 kernel needs "
                         f"beta * scale > 2^-26")
    multiplier, left_shift = quantize_multiplier(real)
    radius = math.floor((2**SCALED_DIFF_INTEGER_BITS - 1) * 2.0 ** (31 - SCALED_DIFF_INTEGER_BITS) / 2.0**left_shift)
    return SoftmaxParams(multiplier, left_shift, -radius)


def softmax(x: NDArray[np.int8], params: SoftmaxParams) -> NDArray[np.int8]:
    """Int8 softmax over the last axis, TFLite ``reference_ops::Softmax`` (gemmlowp fixed point)::

        d = q - max(row)                                   (int32, <= 0)
        e = exp_on_negative_values(SRDHM(d * 2^left_shift, multiplier))   if d >= diff_min else 0   (Q0.31)
        S = sum RoundingDivideByPOT(e, 12)                (Q12.19)
        r, n = GetReciprocal(S, 12)
        out = clamp(RoundingDivideByPOT(SRDHM(r, e), n + 23) - 128)   (-128 where d < diff_min)
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.int8 or x.ndim < 1:
        raise InputError(f"softmax takes an int8 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    rows = x.reshape(-1, x.shape[-1]).astype(np.int64)
    diff = rows - rows.max(axis=1, keepdims=True)
    inside = diff >= params.diff_min
    scaled = saturating_rounding_doubling_high_mul(np.where(inside, diff, 0) << params.left_shift, params.multiplier)
    exp = np.where(inside, exp_on_negative_values(scaled, SCALED_DIFF_INTEGER_BITS), 0)
    total = wrap_int32(rounding_divide_by_pot(exp, 12).astype(np.int64).sum(axis=1))
    inverse, bits_over_unit = reciprocal(total, ACCUMULATION_INTEGER_BITS)
    exponent = bits_over_unit + 31 - 8
    if np.any((exponent < 0) | (exponent > 31)):
        raise InputError("softmax normalization shift out of range (a row too long for the Q12.19 sum)")
    product = saturating_rounding_doubling_high_mul(inverse[:, None], exp)
    out = rounding_divide_by_pot(product, exponent[:, None]).astype(np.int64) - 128
    return np.clip(np.where(inside, out, -128), -128, 127).astype(np.int8).reshape(x.shape)
