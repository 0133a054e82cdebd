"""Int8 LOGISTIC, TANH and SOFTMAX with the semantics of LiteRT's kernels, which build
their tables from float32 arithmetic once (at ``Prepare``) and then only look up.

- LOGISTIC / TANH: a 256-entry int8 table. For each input code ``q``:
  ``x = float32(s_in * (q - zp_in))``, ``y = f(x)`` in float32 (``1 / (1 + expf(-x))`` or
  ``tanhf(x)``), ``code = int(round(y * float32(1 / s_out)) + zp_out)`` with ``round``
  half away from zero, then clamped to int8.
- SOFTMAX (last axis, ``beta``): a 256-entry float32 table ``T[255 - v] = expf(-s_in *
  beta * v)``; per row, ``m = max(q)``, ``S = sum_j T[255 - m + q_j]`` added in order in
  float32, ``inv = 1 / (S * s_out)``, and ``code_j = rint(T[255 - m + q_j] * inv) + zp_out``
  (round half to even), clamped.

``expf`` and ``tanhf`` come from the C math library (as LiteRT's), so the tables match
bit for bit rather than within numpy's own float32 approximations. The output
quantization is fixed by the op: LOGISTIC and SOFTMAX ``1/256, -128``, TANH ``1/128, 0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError

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


def _round_half_away(values: NDArray[np.float32]) -> NDArray[np.float32]:
    return (np.sign(values) * np.floor(np.abs(values) + np.float32(0.5))).astype(np.float32)


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
    rescaled = _round_half_away((y * (np.float32(1) / np.float32(out_scale))).astype(np.float32))
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


@dataclass(frozen=True, eq=False)
class SoftmaxParams:
    """Runtime record of SOFTMAX: the float32 exp table (``table[255 - v] = expf(-s_in *
    beta * v)``) and the output quantization. (LiteRT's int8 softmax keeps this float
    table; it is the one op here that is not integer-only at run time.)"""

    table: NDArray[np.float32]
    output_scale: float
    output_zero_point: int


def softmax_params(input_scale: float, beta: float) -> SoftmaxParams:
    if not np.isfinite(beta) or beta <= 0:
        raise InputError(f"softmax beta must be a positive finite number, got {beta!r}")
    scale = np.float32(-np.float32(input_scale) * np.float32(beta))
    values = np.arange(256, dtype=np.float32)
    table = np.empty(256, dtype=np.float32)
    table[255 - np.arange(256)] = _c_float_function("expf", (scale * values).astype(np.float32))
    out_scale, out_zero_point = FIXED_OUTPUT["SOFTMAX"]
    return SoftmaxParams(table, out_scale, out_zero_point)


def softmax(x: NDArray[np.int8], params: SoftmaxParams) -> NDArray[np.int8]:
    """Int8 softmax over the last axis (see module docstring)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.int8 or x.ndim < 1:
        raise InputError(f"softmax takes an int8 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    rows = x.reshape(-1, x.shape[-1]).astype(np.int32)
    offset = 255 - rows.max(axis=1, keepdims=True)
    values = params.table[offset + rows]  # float32 [rows, depth]
    total = np.zeros(rows.shape[0], dtype=np.float32)
    for column in range(rows.shape[1]):  # sequential float32 sum, as the C++ loop
        total = (total + values[:, column]).astype(np.float32)
    inverse = (np.float32(1) / (total * np.float32(params.output_scale))).astype(np.float32)
    probabilities = (values * inverse[:, None]).astype(np.float32)
    codes = np.rint(probabilities).astype(np.int64) + params.output_zero_point
    return np.clip(codes, -128, 127).astype(np.int8).reshape(x.shape)
