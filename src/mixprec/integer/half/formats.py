"""Half-precision number formats for the engine's float islands, in numpy.

float16 is numpy's ``float16``. bfloat16 has no numpy type, so it travels as its raw bit
pattern in ``uint16`` (the top half of a float32); :func:`bfloat16_to_float32` widens it.

Rounding (:func:`round_to_format`): round to nearest, ties to even, from the exact float64
value; subnormals are kept (float16 below 2^-14 in steps of 2^-24, bfloat16 below 2^-126 in
steps of 2^-133); magnitudes at or beyond ``max + ulp/2`` become infinities, which
:func:`to_float16` and :func:`to_bfloat16` count. NaN stays NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mixprec.errors import InputError


@dataclass(frozen=True)
class HalfFormat:
    """A binary floating-point format: ``mantissa_bits`` stored fraction bits, the smallest
    normal exponent ``min_exponent`` and the largest finite value ``max_value``."""

    name: str
    mantissa_bits: int
    min_exponent: int
    max_value: float


FORMATS = {
    "float16": HalfFormat("float16", 10, -14, 65504.0),
    "bfloat16": HalfFormat("bfloat16", 7, -126, float.fromhex("0x1.fep127")),
}


def half_format(name: str) -> HalfFormat:
    """The format called ``name`` (``"float16"`` or ``"bfloat16"``)."""
    if name not in FORMATS:
        raise InputError(f"unknown half format {name!r}; choose {', '.join(FORMATS)}")
    return FORMATS[name]


def round_to_format(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """``values`` (taken exactly as float64) rounded to the nearest value of format ``name``
    (see module docstring), returned as float64."""
    fmt = half_format(name)
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        _, exponent = np.frexp(x)  # x = m * 2^exponent, 0.5 <= |m| < 1
        exponent = np.maximum(exponent - 1, fmt.min_exponent)  # subnormals share the smallest quantum
        quantum = np.ldexp(1.0, exponent - fmt.mantissa_bits)
        rounded = np.round(x / quantum) * quantum  # exact scaling by a power of two; np.round is half-even
        overflow = np.abs(rounded) > fmt.max_value
        return np.where(np.isfinite(x) & ~overflow, rounded, np.where(np.isnan(x), np.nan, np.copysign(np.inf, x)))


@dataclass(frozen=True)
class HalfArray:
    """A converted array and how many finite inputs overflowed to infinity."""

    values: NDArray
    overflowed: int


def to_float16(values: ArrayLike) -> HalfArray:
    """``values`` as float16 (see module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    rounded = round_to_format(x, "float16")
    return HalfArray(rounded.astype(np.float16), int((np.isfinite(x) & np.isinf(rounded)).sum()))


def to_bfloat16(values: ArrayLike) -> HalfArray:
    """``values`` as bfloat16 bit patterns in uint16 (see module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    rounded = round_to_format(x, "bfloat16")
    bits = (rounded.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact: rounded fits bf16
    return HalfArray(bits, int((np.isfinite(x) & np.isinf(rounded)).sum()))


def bfloat16_to_float32(bits: NDArray[np.uint16]) -> NDArray[np.float32]:
    """Widen bfloat16 bit patterns to float32 (exact)."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint16:
        raise InputError(f"bfloat16 values travel as uint16 bit patterns, got "
                         f"{getattr(bits, 'dtype', type(bits).__name__)}")
    return (bits.astype(np.uint32) << 16).view(np.float32)
