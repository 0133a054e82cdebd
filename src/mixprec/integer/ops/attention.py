"""Int8 single-head attention over ``[..., S, P]`` query, key and value codes.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier

EXP_BITS = 24
RATIO_BITS = 16


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


def _check(q: NDArray, k: NDArray, v: NDArray) -> None:
    for name, array in (("query", q), ("key", k), ("value", v)):
        if not isinstance(array, np.ndarray) or array.dtype != np.int8 or array.ndim < 2:
            raise InputError(f"attention {name} must be an int8 numpy array [..., S, P], got "
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
