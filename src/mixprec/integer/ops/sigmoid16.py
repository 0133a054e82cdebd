"""16x8 LOGISTIC and TANH (int16 in, int16 out on the ``1/32768, 0`` grid) with the semantics of
LiteRT's reference kernels (``reference_integer_ops::Logistic`` / ``Tanh`` for int16).

Both interpolate one 256-entry table of the sigmoid in unsigned 0.16 fixed point,
``T[i] ~ 65536 * sigmoid(i / 24)`` for ``i = 0 .. 255`` (``x`` from 0 to 10.625), its nodes moved
by half the interpolation error at mid-step (see :func:`sigmoid_table`).

``Prepare`` (input scale ``s``, zero points 0, output scale ``2^-15``): ``k = round(log2(s))``
computed in float32; if ``s`` is a power of two (``|log2(s) - k| < 1e-3``) and ``12 + k`` is 0
(LOGISTIC) or 0 or 1 (TANH), the multiplier is ``m = 3 << (12 + k)`` with no shift; otherwise
``m = s * 12288`` (in double) doubled while ``m <= 16383.5`` (counting the doublings ``n``, at
most 31), truncated to an integer. The input then sits on the grid ``v = (x * m + r) >> n``
(``r = 2^(n - 1)``, 0 when ``n = 0``, an arithmetic shift) where ``v = 12288`` means ``x = 1``.

LOGISTIC of ``v``: ``a = |v|``, ``h = a >> 9``; ``p = (T[h] << 9) + (a & 511) * (T[h+1] - T[h])``
(``p = 32767 << 10`` when ``h >= 255``); ``out = (p + 512) >> 10`` for ``v >= 0`` and
``(2^25 - p + 511) >> 10`` otherwise.

TANH (``tanh(x) = 2 sigmoid(2x) - 1``, so the same table at twice the resolution): ``h = a >> 8``;
``p = (T[h] << 8) + (a & 255) * (T[h+1] - T[h])`` (``65535 << 8`` when ``h >= 255``);
``out = (p - 2^23 + 128) >> 8`` for ``v >= 0`` and ``(2^23 - p + 127) >> 8`` otherwise.
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
from mixprec.integer.core.tensors import require_array
from mixprec.integer.ops.softmax16 import SOFTMAX16_OUTPUT

#: The output grid of both ops in 16x8: (scale, zero point), the 16x8 SOFTMAX's.
SIGMOID16_OUTPUT = SOFTMAX16_OUTPUT
#: Table entries per unit of x (the table covers sigmoid on [0, 255 / 24]).
TABLE_STEPS_PER_UNIT = 24
#: Input codes per unit of x on the kernels' internal grid (``3 * 4096``).
CODES_PER_UNIT = 3 * 4096
#: Largest multiplier the kernels take: ``x * m`` stays inside int32 for every int16 ``x``.
MAX_MULTIPLIER = 32767
#: Doublings of the multiplier at most (LiteRT's loop stops once the shift passes 30).
MAX_SHIFT = 31
_POWER_OF_TWO_SHIFTS = {"LOGISTIC": (0,), "TANH": (0, 1)}


def _round(value: float) -> float:
    """C's ``round``: to nearest, halves away from zero."""
    return math.copysign(math.floor(abs(value) + 0.5), value)


@cache
def sigmoid_table() -> NDArray[np.int64]:
    """The 256-entry unsigned 0.16 sigmoid table, ``x_i = i / 24``:
    ``T[i] = round(65536 * (sigmoid(x_i) - sigmoid''(x_i) * h^2 / 16))`` with ``h = 1/24`` and
    ``sigmoid'' = s (1 - s) (1 - 2 s)``, in double, ``round`` to nearest (no entry is a tie); the
    last entry is 65535, the value both kernels saturate to past the table (the formula gives
    65534.4 there).

    Linear interpolation between exact samples of a concave function falls short by about
    ``-f'' h^2 / 8`` at mid-step; moving every node by half of that centres the error. This
    closed form reproduces LiteRT's stored ``sigmoid_table_uint16``, which is not a plain
    rounding of ``65536 * sigmoid(x_i)`` (it differs from one by up to 1.1): all 65,536 int16
    inputs of both ops give LiteRT's bytes at every scale the tests try."""
    x = np.arange(256, dtype=np.float64) / TABLE_STEPS_PER_UNIT
    s = 1.0 / (1.0 + np.exp(-x))
    curvature = s * (1.0 - s) * (1.0 - 2.0 * s)
    table = np.rint(65536.0 * (s - curvature / (16.0 * TABLE_STEPS_PER_UNIT**2))).astype(np.int64)
    table[-1] = 65535
    return table


@cache
def _libm_logf() -> ctypes._CFuncPtr:
    function = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").logf
    function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float]
    return function


def _checked_log2(scale: float) -> tuple[int, bool]:
    """LiteRT's ``CheckedLog2`` in float32: ``(round(log2(s)), whether s is within 1e-3 of it in log2)``."""
    log2 = np.float32(_libm_logf()(scale)) * (np.float32(1.0) / np.float32(_libm_logf()(2.0)))
    rounded = np.float32(_round(float(log2)))
    return int(rounded), bool(abs(np.float32(log2 - rounded)) < np.float32(1e-3))


@dataclass(frozen=True)
class Sigmoid16Params:
    """Runtime record of an int16 LOGISTIC or TANH: ``v = (x * multiplier + r) >> shift``."""

    kind: str
    multiplier: int
    shift: int

    def __post_init__(self) -> None:
        if self.kind not in _POWER_OF_TWO_SHIFTS:
            raise InputError(f"the int16 sigmoid kernels are LOGISTIC and TANH, not {self.kind!r}")
        if not 0 < self.multiplier <= MAX_MULTIPLIER or not 0 <= self.shift <= MAX_SHIFT:
            raise InputError(f"invalid int16 {self.kind} record: multiplier {self.multiplier} (1..{MAX_MULTIPLIER}), "
                             f"shift {self.shift} (0..{MAX_SHIFT})")


def sigmoid16_params(kind: str, input_scale: float) -> Sigmoid16Params:
    """LiteRT's ``Prepare`` of an int16 LOGISTIC or TANH for an input of scale ``input_scale``
    (zero point 0; see the module docstring)."""
    if kind not in _POWER_OF_TWO_SHIFTS:
        raise InputError(f"the int16 sigmoid kernels are LOGISTIC and TANH, not {kind!r}")
    scale = float(np.float32(input_scale))
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"int16 {kind} needs a positive finite input scale, got {input_scale!r}")
    log2, exact = _checked_log2(scale)
    if exact and 12 + log2 in _POWER_OF_TWO_SHIFTS[kind]:
        return Sigmoid16Params(kind, 3 << (12 + log2), 0)
    multiplier, shift = scale * CODES_PER_UNIT, 0
    while multiplier <= MAX_MULTIPLIER / 2.0 and shift < MAX_SHIFT:
        shift += 1
        multiplier *= 2.0
    if multiplier > MAX_MULTIPLIER:
        largest = MAX_MULTIPLIER / CODES_PER_UNIT
        raise InputError(f"int16 {kind} input scale {input_scale} is too large: the kernel takes scales up to "
                         f"{largest:.4f} (int16 codes then span +-{32767 * largest:.0f}, far past where the function "
                         "saturates)")
    if multiplier < 1.0:
        raise InputError(f"int16 {kind} input scale {input_scale} is too small: every input maps to 0")
    return Sigmoid16Params(kind, int(multiplier), shift)


def sigmoid16(x: NDArray[np.int16], params: Sigmoid16Params) -> NDArray[np.int16]:
    """int16 ``x`` -> int16 LOGISTIC or TANH on the ``1/32768`` grid (see the module docstring)."""
    require_array(params.kind, x, np.int16)
    rounding = (1 << (params.shift - 1)) if params.shift > 0 else 0
    v = (x.astype(np.int64) * params.multiplier + rounding) >> params.shift
    magnitude = np.abs(v)
    bits = 9 if params.kind == "LOGISTIC" else 8
    index = magnitude >> bits
    inside = index < 255
    table = sigmoid_table()
    low = table[np.minimum(index, 254)]
    high = table[np.minimum(index, 254) + 1]
    interpolated = (low << bits) + (magnitude & ((1 << bits) - 1)) * (high - low)
    if params.kind == "LOGISTIC":
        p = np.where(inside, interpolated, 32767 << 10)
        out = np.where(v >= 0, (p + 512) >> 10, ((1 << 25) - p + 511) >> 10)
    else:
        p = np.where(inside, interpolated, 65535 << 8)
        out = np.where(v >= 0, (p - (1 << 23) + 128) >> 8, ((1 << 23) - p + 127) >> 8)
    return out.astype(np.int16)
