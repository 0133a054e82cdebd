"""16x8 SOFTMAX (int16 in, int16 out on the ``1/32768, 0`` grid) with the semantics of LiteRT's
reference kernel (``reference_ops::SoftmaxInt16``), and the interpolated 513-entry int16
tables it looks values up in.

Tables (LiteRT's ``gen_lut``, at ``Prepare``, in double): ``f`` over ``[lo, hi]`` in 512 steps
of ``(hi - lo) / 512``; entry ``i`` is ``round(f(lo + i * step) * 32768)`` less half the error
that linear interpolation would make at the step's midpoint (``round`` half away from zero,
clamped to int16), entry 512 is ``round(f(hi) * 32768)``; ``exp`` over ``[-10, 0]`` and
``1 / (1 + x)`` over ``[0, 1]``, both from the C math library. A lookup of ``v`` takes entry
``256 + (v >> 7)`` plus ``(slope * (v & 127) + 64) >> 7``. (LiteRT's newer float32
``LUTPopulate`` with grid-derived ranges gave 2,734 of 38,400 outputs off by one; this form 0.)

SOFTMAX per row (last axis): ``d = x - max(x)``; ``d' = MBQM(d, m, s)`` onto ``[-65535, 0] ~
[-10, 0]`` (``m, s = quantize_multiplier(double(s_in) * beta / (10 / 65535))``), recentred by
``+32767`` and clamped; ``e = exp_table(d')`` (Q0.15); ``S = sum(e)``; with ``h`` the leading
zeros of ``S`` as uint32, ``S' = ((S << (h - 1)) + 2^13) >> 14`` recentred by ``-(2^15 + 2^16)``
and clamped; ``r = one_over_one_plus_x_table(S')``; ``out = clamp((e * r + 2^(30 - h)) >> (31 -
h), 0, 32767)``. ``MBQM`` is the double-rounding
:func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier` (the single-rounding
form gave the same 38,400 test outputs: the data did not tell them apart).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier
from mixprec.integer.core.tensors import require_array

#: The 16x8 SOFTMAX output grid: (scale, zero point).
SOFTMAX16_OUTPUT = (1.0 / 32768, 0)
_STEPS = 512


def int16_table(function: Callable[[float], float], low: float, high: float) -> NDArray[np.int16]:
    """LiteRT's 513-entry int16 table of ``function`` over ``[low, high]`` (see module docstring)."""
    step = (high - low) / _STEPS
    half_step = step / 2
    table = []
    for i in range(_STEPS):
        start = low + i * step
        sample = _round(function(start) * 32768.0)
        interpolated = _round((function(low + (i + 1) * step) * 32768.0 + sample) / 2.0)
        bias = _round((interpolated - _round(function(start + half_step) * 32768.0)) / 2.0)
        table.append(sample - bias)
    table.append(_round(function(high) * 32768.0))
    return np.clip(np.array(table), -32768, 32767).astype(np.int16)


def _round(value: float) -> float:
    """C's ``round``: to nearest, halves away from zero."""
    return math.copysign(math.floor(abs(value) + 0.5), value)


def table_lookup(values: NDArray, table: NDArray[np.int16]) -> NDArray[np.int64]:
    """Interpolated lookup of int16 ``values`` in a 513-entry table (see module docstring)."""
    v = values.astype(np.int64)
    index = 256 + (v >> 7)
    base = table.astype(np.int64)[index]
    slope = table.astype(np.int64)[index + 1] - base
    return (base + ((slope * (v & 0x7F) + 64) >> 7)).astype(np.int16).astype(np.int64)


def _one_over_one_plus(x: float) -> float:
    return 1.0 / (1.0 + x)


@dataclass(frozen=True, eq=False)
class Softmax16Params:
    """Runtime record of a 16x8 SOFTMAX: the input rescale and the two tables."""

    multiplier: int
    shift: int
    exp_table: NDArray[np.int16]
    reciprocal_table: NDArray[np.int16]


def softmax16_params(input_scale: float, beta: float) -> Softmax16Params:
    """LiteRT's ``Prepare`` for an int16 SOFTMAX (see module docstring)."""
    if not np.isfinite(beta) or beta <= 0:
        raise InputError(f"softmax beta must be a positive finite number, got {beta!r}")
    multiplier, shift = quantize_multiplier(float(np.float32(input_scale)) * float(np.float32(beta)) / (10.0 / 65535.0))
    return Softmax16Params(multiplier, shift, _tables()[0], _tables()[1])


@cache
def _tables() -> tuple[NDArray[np.int16], NDArray[np.int16]]:
    """The exp and reciprocal tables: fixed, so built once."""
    return int16_table(math.exp, -10.0, 0.0), int16_table(_one_over_one_plus, 0.0, 1.0)


def softmax16(x: NDArray[np.int16], params: Softmax16Params) -> NDArray[np.int16]:
    """int16 ``x`` -> int16 softmax over the last axis on the ``1/32768`` grid (see module docstring)."""
    require_array("softmax16", x, np.int16)
    diff = x.astype(np.int64) - x.max(axis=-1, keepdims=True)
    scaled = multiply_by_quantized_multiplier(diff, params.multiplier, params.shift).astype(np.int64)
    exps = table_lookup(np.clip(scaled + 32767, -32768, 32767), params.exp_table)
    total = exps.sum(axis=-1, keepdims=True)
    headroom = 32 - np.frexp(total.astype(np.float64))[1].astype(np.int64)  # leading zeros of total as uint32
    shifted = ((total << (headroom - 1)) + (1 << 13)) >> 14
    reciprocal = table_lookup(np.clip(shifted - ((1 << 15) + (1 << 16)), -32768, 32767), params.reciprocal_table)
    right_shift = 31 - headroom
    result = (exps * reciprocal + (np.int64(1) << (right_shift - 1))) >> right_shift
    return np.clip(result, 0, 32767).astype(np.int16)
