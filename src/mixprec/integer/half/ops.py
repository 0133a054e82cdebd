"""Operators of the half-precision islands (float16 or bfloat16), on "half values": float32
arrays whose every element is exactly representable in the island's format.

One arithmetic rule for all of them: inputs are exact half values; every product of two of
them is exact in float32 (at most 22 significant bits); sums accumulate in float32 in the
stated index order, one IEEE rounding per addition (no fused multiply-add); each operator
rounds its result once to the half format (:func:`round_half`, nearest, ties to even). So a
result is a function of the inputs alone, whatever the machine, and faster implementations
can be tested for bit equality against these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.half.formats import half_format

HalfValues = NDArray[np.float32]


def round_half(x: NDArray[np.float32], dtype: str) -> HalfValues:
    """float32 ``x`` rounded to ``dtype`` (nearest, ties to even; subnormals kept; overflow to
    infinity), returned as float32 half values. float16 uses numpy's conversion (correctly
    rounded); bfloat16 the bit form ``(bits + 0x7FFF + lsb) >> 16`` with NaN kept quiet."""
    half_format(dtype)
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, rounded)


@dataclass(frozen=True, eq=False)
class HalfLinearParams:
    """A linear layer of an island: ``weight`` half values ``[out, in]``, ``bias`` ``[out]`` or None."""

    weight: HalfValues
    bias: HalfValues | None
    dtype: str

    def __post_init__(self) -> None:
        half_format(self.dtype)
        if self.weight.dtype != np.float32 or self.weight.ndim != 2:
            raise InputError(f"weight must be 2-D float32 half values, got {self.weight.dtype} {self.weight.shape}")
        if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
            raise InputError(f"bias must have shape ({self.weight.shape[0]},), got {self.bias.shape}")
        for name, array in (("weight", self.weight), ("bias", self.bias)):
            if array is not None and not np.array_equal(round_half(array, self.dtype), array, equal_nan=True):
                raise InputError(f"{name} holds values that are not {self.dtype} values; round them first")


def half_linear(x: HalfValues, params: HalfLinearParams) -> HalfValues:
    """``x [..., in] -> [..., out]``: ``sum_k x[k] * w[o, k]`` for k = 0, 1, ..., then ``+ bias``,
    then one rounding."""
    if x.shape[-1] != params.weight.shape[1]:
        raise InputError(f"half_linear takes {params.weight.shape[1]} features, got shape {x.shape}")
    acc = np.zeros((*x.shape[:-1], params.weight.shape[0]), dtype=np.float32)
    for k in range(params.weight.shape[1]):
        acc += x[..., k:k + 1] * params.weight[:, k]
    if params.bias is not None:
        acc += params.bias
    return round_half(acc, params.dtype)


@dataclass(frozen=True, eq=False)
class LinearAttentionParams:
    """A single-head linear attention with the ReLU feature map, ``query``/``key``/``value``
    projections (``[E, E]``), and ``epsilon`` (a half value) added to each normalizer."""

    query: HalfLinearParams
    key: HalfLinearParams
    value: HalfLinearParams
    epsilon: float

    def __post_init__(self) -> None:
        dtypes = {self.query.dtype, self.key.dtype, self.value.dtype}
        if len(dtypes) != 1:
            raise InputError(f"query, key and value must share one half format, got {sorted(dtypes)}")
        if not self.epsilon > 0 or float(round_half(np.float32(self.epsilon), self.dtype)) != self.epsilon:
            raise InputError(f"epsilon must be a positive {self.dtype} value, got {self.epsilon}")

    @property
    def dtype(self) -> str:
        return self.query.dtype


def linear_attention(x: HalfValues, params: LinearAttentionParams) -> HalfValues:
    """``x [..., S, E]`` -> ``[..., S, E]``, each line one rounded operator::

        q, k, v = relu(linear(x)) , relu(linear(x)), linear(x)
        kv[e, f] = sum_s k[s, e] * v[s, f]          (s = 0, 1, ...)
        z[e]     = sum_s k[s, e]                    (s = 0, 1, ...)
        num[s, f] = sum_e q[s, e] * kv[e, f]        (e = 0, 1, ...)
        den[s]    = (sum_e q[s, e] * z[e]) + epsilon       (the sum rounded, then the addition rounded)
        out[s, f] = num[s, f] / den[s]              (float32 division, then rounding)
    """
    dtype = params.dtype
    q = np.maximum(half_linear(x, params.query), np.float32(0))
    k = np.maximum(half_linear(x, params.key), np.float32(0))
    v = half_linear(x, params.value)
    steps, width = x.shape[-2], v.shape[-1]
    kv = np.zeros((*x.shape[:-2], k.shape[-1], width), dtype=np.float32)
    z = np.zeros((*x.shape[:-2], k.shape[-1]), dtype=np.float32)
    for s in range(steps):
        kv += k[..., s, :, None] * v[..., s, None, :]
        z += k[..., s, :]
    kv, z = round_half(kv, dtype), round_half(z, dtype)
    num = np.zeros((*x.shape[:-1], width), dtype=np.float32)
    den = np.zeros(x.shape[:-1], dtype=np.float32)
    for e in range(k.shape[-1]):
        num += q[..., e:e + 1] * kv[..., None, e, :]
        den += q[..., e] * z[..., None, e]
    num = round_half(num, dtype)
    den = round_half(round_half(den, dtype) + np.float32(params.epsilon), dtype)
    with np.errstate(invalid="ignore", divide="ignore"):  # inf / inf is NaN, refused at the int8 bridge
        return round_half(num / den[..., None], dtype)


def half_add(a: HalfValues, b: HalfValues, dtype: str) -> HalfValues:
    """``a + b`` (one float32 addition, exact for half inputs up to the final rounding)."""
    return round_half(a + b, dtype)


def half_mean(x: HalfValues, axis: int, dtype: str) -> HalfValues:
    """Mean over ``axis``: a float32 sum in index order, divided by the count in float32, one rounding."""
    total = np.zeros(np.delete(x.shape, axis), dtype=np.float32)
    for index in range(x.shape[axis]):
        total += np.take(x, index, axis=axis)
    return round_half(total / np.float32(x.shape[axis]), dtype)
