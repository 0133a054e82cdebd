"""Single-head attention over ``[..., S, P]`` query, key and value codes: int8, and int16
(16x8 activations, zero points 0; mixprec's own operators, TFLite has no builtin).

Softmax attention (TFLite int8 style, integers only at run time)::

    score[s, t] = clamp(MBQM(sum_p (q - zq)(k - zk), m_score, shift_score) + z_score)
                  # m_score from s_q * s_k / (sqrt(P) * s_score): 1/sqrt(P) folded in
    d[s, t]     = max_t score[s, t] - score[s, t]            (0..255)
    e[s, t]     = table[d]        table[d] = round_half_even(2^24 * exp(-s_score * d)) (builder)
    prob[s, t]  = clamp((512 * e + total) // (2 * total) - 128, -128, 127)   total = sum_t e[s, t]
                  # nearest step of 1/256 (ties up), zero point -128
    out[s, f]   = clamp(MBQM(sum_t (prob + 128)(v - zv), m_out, shift_out) + z_out)
                  # m_out from s_v / (256 * s_out)

Linear attention with the ReLU feature map (its q and k codes come from FULLY_CONNECTED with
ReLU, so ``q - zq >= 0`` and ``k - zk >= 0``)::

    kv[e, f] = sum_t (k - zk)[t, e] (v - zv)[t, f]      z[e] = sum_t (k - zk)[t, e]
    num[s, f] = sum_e (q - zq)[s, e] kv[e, f]           den[s] = sum_e (q - zq)[s, e] z[e] + eps_q
    ratio    = round_half_away(num * 2^16 / den)        # |ratio| <= 255 * 2^16: a convex mix of v
    out      = clamp(MBQM(ratio, m_out, shift_out) + z_out)    # m_out from s_v / (2^16 * s_out)

with ``eps_q = max(1, round_half_even(epsilon / (s_q * s_k)))``. ``MBQM`` is the
double-rounding :func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier`; all
sums are exact in int64.

int16 forms (every tensor symmetric, zero point 0; ``MBQM64`` is the single-rounding
:func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier_single_round_int64`,
for accumulators beyond int32)::

    score = clamp(MBQM64(q @ k^T, m_score, shift_score), -32768, 32767)   # on the int16 score grid
    prob  = softmax16(score)          # LiteRT's 16x8 SOFTMAX (mixprec.integer.ops.softmax16), 1/32768 grid
    out   = clamp(MBQM64(prob @ v, m_out, shift_out), -32768, 32767)       # m_out from s_v / (32768 * s_out)

    linear: num, den as above on the int16 codes (exact in int64 for S * P < 2^17);
    ratio = round_half_away(num / den)    # a convex mix of v codes: already on v's int16 grid
    out   = clamp(MBQM64(ratio, m_out, shift_out), -32768, 32767)         # m_out from s_v / s_out
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import (
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_round_int64,
    quantize_multiplier,
)
from mixprec.integer.ops.softmax16 import Softmax16Params, softmax16, softmax16_params

EXP_BITS = 24
RATIO_BITS = 16
#: Longest ``S * P`` whose int16 linear-attention sums provably fit int64 (see module docstring).
MAX_INT16_LINEAR_SPAN = 2**17


@dataclass(frozen=True, eq=False)
class SoftmaxAttentionParams:
    """Runtime record of softmax attention: integers only (see module docstring)."""

    query_zero_point: int
    key_zero_point: int
    value_zero_point: int
    score_multiplier: int
    score_shift: int
    score_zero_point: int
    exp_table: NDArray[np.int32]
    output_multiplier: int
    output_shift: int
    output_zero_point: int

    def __post_init__(self) -> None:
        table = self.exp_table
        if table.dtype != np.int32 or table.shape != (256,) or table[0] != 2**EXP_BITS or np.any(np.diff(table) > 0):
            raise InputError(f"the exp table must hold 256 non-increasing entries starting at 2^{EXP_BITS}")


@dataclass(frozen=True, eq=False)
class LinearAttentionInt8Params:
    """Runtime record of int8 linear attention: integers only (see module docstring)."""

    query_zero_point: int
    key_zero_point: int
    value_zero_point: int
    epsilon: int
    output_multiplier: int
    output_shift: int
    output_zero_point: int

    def __post_init__(self) -> None:
        if self.epsilon < 1:
            raise InputError(f"the integer epsilon must be >= 1 (it keeps the normalizer positive), got {self.epsilon}")


@dataclass(frozen=True, eq=False)
class Int16AttentionParams:
    """Runtime record of int16 softmax or linear attention (see module docstring): the score
    rescale and the SOFTMAX record (softmax only), the integer epsilon (linear only), the output
    rescale."""

    score_multiplier: int
    score_shift: int
    softmax: Softmax16Params | None
    epsilon: int
    output_multiplier: int
    output_shift: int


def int16_attention_params(width: int, query: float, key: float, value: float, output: float,
                           score: float | None = None, epsilon: float | None = None) -> Int16AttentionParams:
    """The record from each int16 tensor's scale: softmax attention with the ``score`` grid's
    scale, or linear attention with its float ``epsilon`` (exactly one of the two)."""
    if (score is None) == (epsilon is None):
        raise InputError("int16 attention takes a score scale (softmax) or an epsilon (linear), exactly one")
    s_q, s_k, s_v, s_o = (float(np.float32(s)) for s in (query, key, value, output))
    if score is not None:
        s_s = float(np.float32(score))
        score_m, score_shift = quantize_multiplier(s_q * s_k / (math.sqrt(width) * s_s))
        out_m, out_shift = quantize_multiplier(s_v / (32768 * s_o))
        return Int16AttentionParams(score_m, score_shift, softmax16_params(s_s, 1.0), 0, out_m, out_shift)
    out_m, out_shift = quantize_multiplier(s_v / s_o)
    return Int16AttentionParams(0, 0, None, max(1, int(np.round(epsilon / (s_q * s_k)))), out_m, out_shift)


def softmax_attention_params(width: int, query: tuple[float, int], key: tuple[float, int], value: tuple[float, int],
                             score: tuple[float, int], output: tuple[float, int]) -> SoftmaxAttentionParams:
    """The record from each tensor's ``(scale, zero_point)`` and the head width ``P``."""
    (s_q, z_q), (s_k, z_k), (s_v, z_v), (s_s, z_s), (s_o, z_o) = (
        (float(np.float32(s)), int(z)) for s, z in (query, key, value, score, output))
    score_m, score_shift = quantize_multiplier(s_q * s_k / (math.sqrt(width) * s_s))
    out_m, out_shift = quantize_multiplier(s_v / (256 * s_o))
    table = np.round(2.0**EXP_BITS * np.exp(-s_s * np.arange(256))).astype(np.int32)
    return SoftmaxAttentionParams(z_q, z_k, z_v, score_m, score_shift, z_s, table, out_m, out_shift, z_o)


def linear_attention_int8_params(epsilon: float, query: tuple[float, int], key: tuple[float, int],
                                 value: tuple[float, int], output: tuple[float, int]) -> LinearAttentionInt8Params:
    """The record from each tensor's ``(scale, zero_point)`` and the float ``epsilon``."""
    (s_q, z_q), (s_k, z_k), (s_v, z_v), (s_o, z_o) = (
        (float(np.float32(s)), int(z)) for s, z in (query, key, value, output))
    out_m, out_shift = quantize_multiplier(s_v / (2**RATIO_BITS * s_o))
    return LinearAttentionInt8Params(z_q, z_k, z_v, max(1, int(np.round(epsilon / (s_q * s_k)))), out_m, out_shift,
                                     z_o)


def _check(q: NDArray, k: NDArray, v: NDArray, dtype: type = np.int8) -> None:
    for name, array in (("query", q), ("key", k), ("value", v)):
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim < 2:
            raise InputError(f"attention {name} must be an {np.dtype(dtype).name} numpy array [..., S, P], got "
                             f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise InputError(f"attention shapes do not match: query {q.shape}, key {k.shape}, value {v.shape}")


def _requantize(acc: NDArray[np.int64], multiplier: int, shift: int, zero_point: int) -> NDArray[np.int8]:
    scaled = multiply_by_quantized_multiplier(acc, multiplier, shift).astype(np.int64)
    return np.clip(scaled + zero_point, -128, 127).astype(np.int8)


def softmax_attention(q: NDArray[np.int8], k: NDArray[np.int8], v: NDArray[np.int8],
                      params: SoftmaxAttentionParams) -> NDArray[np.int8]:
    """int8 query/key/value ``[..., S, P]`` -> int8 ``[..., S, P_v]`` (see module docstring)."""
    _check(q, k, v)
    qc = q.astype(np.int64) - params.query_zero_point
    kc = k.astype(np.int64) - params.key_zero_point
    scores = _requantize(qc @ np.swapaxes(kc, -1, -2), params.score_multiplier, params.score_shift,
                         params.score_zero_point).astype(np.int64)
    exps = params.exp_table.astype(np.int64)[scores.max(axis=-1, keepdims=True) - scores]
    total = exps.sum(axis=-1, keepdims=True)
    probs = np.clip((512 * exps + total) // (2 * total) - 128, -128, 127)
    acc = (probs + 128) @ (v.astype(np.int64) - params.value_zero_point)
    return _requantize(acc, params.output_multiplier, params.output_shift, params.output_zero_point)


def linear_attention_int8(q: NDArray[np.int8], k: NDArray[np.int8], v: NDArray[np.int8],
                          params: LinearAttentionInt8Params) -> NDArray[np.int8]:
    """int8 query/key/value ``[..., S, P]`` -> int8 ``[..., S, P_v]`` (see module docstring)."""
    _check(q, k, v)
    qc = np.maximum(q.astype(np.int64) - params.query_zero_point, 0)
    kc = np.maximum(k.astype(np.int64) - params.key_zero_point, 0)
    vc = v.astype(np.int64) - params.value_zero_point
    kv = np.swapaxes(kc, -1, -2) @ vc
    num = qc @ kv
    den = (qc * kc.sum(axis=-2)[..., None, :]).sum(axis=-1, keepdims=True) + params.epsilon
    scaled = num << RATIO_BITS
    ratio = np.sign(scaled) * ((2 * np.abs(scaled) + den) // (2 * den))  # nearest, ties away from zero
    return _requantize(ratio, params.output_multiplier, params.output_shift, params.output_zero_point)


def _requantize16(acc: NDArray[np.int64], multiplier: int, shift: int) -> NDArray[np.int16]:
    scaled = multiply_by_quantized_multiplier_single_round_int64(acc, multiplier, shift).astype(np.int64)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def softmax_attention16(q: NDArray[np.int16], k: NDArray[np.int16], v: NDArray[np.int16],
                        params: Int16AttentionParams) -> NDArray[np.int16]:
    """int16 query/key/value ``[..., S, P]`` -> int16 ``[..., S, P_v]`` (see module docstring)."""
    _check(q, k, v, np.int16)
    if params.softmax is None:
        raise InputError("softmax_attention16 needs a softmax record (int16_attention_params with score=...)")
    scores = _requantize16(q.astype(np.int64) @ np.swapaxes(k.astype(np.int64), -1, -2), params.score_multiplier,
                           params.score_shift)
    probs = softmax16(scores, params.softmax).astype(np.int64)
    return _requantize16(probs @ v.astype(np.int64), params.output_multiplier, params.output_shift)


def linear_attention16(q: NDArray[np.int16], k: NDArray[np.int16], v: NDArray[np.int16],
                       params: Int16AttentionParams) -> NDArray[np.int16]:
    """int16 query/key/value ``[..., S, P]`` -> int16 ``[..., S, P_v]`` (see module docstring)."""
    _check(q, k, v, np.int16)
    if q.shape[-2] * q.shape[-1] >= MAX_INT16_LINEAR_SPAN:
        raise InputError(f"int16 linear attention sums exactly in int64 only for S * P < {MAX_INT16_LINEAR_SPAN}, got "
                         f"S = {q.shape[-2]}, P = {q.shape[-1]}")
    qc, kc = np.maximum(q.astype(np.int64), 0), np.maximum(k.astype(np.int64), 0)
    num = qc @ (np.swapaxes(kc, -1, -2) @ v.astype(np.int64))
    den = (qc * kc.sum(axis=-2)[..., None, :]).sum(axis=-1, keepdims=True) + params.epsilon
    ratio = np.sign(num) * ((2 * np.abs(num) + den) // (2 * den))  # nearest, ties away from zero
    return _requantize16(ratio, params.output_multiplier, params.output_shift)
