"""Layer normalization over the last axis, in integers only: int8, or int16 (mixprec's own
16x8 form; TFLite has no builtin) with zero points 0.

For one row of ``E`` codes ``x`` on ``(s_x, zp_x)``, with ``c = x - zp_x``::

    S   = sum(c)                       d_i = E * c_i - S          (= E * (c_i - mean), exact)
    V   = sum(d_i^2) + eps_q           eps_q = round_half_even(eps * E^3 / s_x^2)   (builder)
    t   = 0 (int8); int16: max(0, ceil((bit_length(V) - 28) / 2))
    r   = floor(sqrt(floor(2^60 / floor(V / 4^t))))               (~ 2^(30 + t) / sqrt(V); 0 when V = 0)
    n_i = d_i * r                      for t = 0, else (d_i * r + 2^(t - 1)) >> t   (ties toward +inf)
    out = clamp(sign_i * MBQM(n_i, m_i, shift_i) + beta_q_i + zp_out, type's range)

where ``m_i, shift_i = quantize_multiplier(|gamma_i| * sqrt(E) / (s_out * 2^30))`` and
``sign_i = sign(gamma_i)``, ``beta_q_i = round_half_even(beta_i / s_out)`` (the builder's
float work). This is ``gamma * (x - mean) / sqrt(var + eps) + beta`` because
``(x_i - mean) / sqrt(var + eps) = d_i * sqrt(E) / sqrt(V)``. Bounds: ``|d_i| <= sqrt(V)`` so
``|n_i| <= 2^30 + 1``. int8: ``V < 2^60`` for ``E <= 2^14``. int16 (``|c| <= 2^15``): ``V <= E^3 *
2^32 < 2^63`` for ``E <= 1024``; reducing ``V`` below ``2^28`` first keeps ``r`` above ``2^16``
(16 significant bits for a 16-bit output; without it a typical int16 row left ``r`` 8 bits).
``MBQM`` is the double-rounding
:func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier`; the integer square
root is exact (float estimate, then integer correction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier

RSQRT_BITS = 30
MAX_WIDTH = 2**14
#: Widest int16 row whose variance sum provably fits int64 (see module docstring).
MAX_WIDTH_INT16 = 2**10
_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.int16): (-32768, 32767)}


@dataclass(frozen=True, eq=False)
class LayerNormParams:
    """Runtime record: integers only (see module docstring)."""

    input_zero_point: int
    epsilon: int
    sign: NDArray[np.int64]
    multiplier: NDArray[np.int32]
    shift: NDArray[np.int32]
    beta: NDArray[np.int32]
    output_zero_point: int

    def __post_init__(self) -> None:
        width = self.sign.shape[0]
        if not 1 <= width <= MAX_WIDTH:
            raise InputError(f"layer norm width must lie in 1..{MAX_WIDTH}, got {width}")
        if any(getattr(self, name).shape != (width,) for name in ("multiplier", "shift", "beta")):
            raise InputError(f"sign, multiplier, shift and beta must all have shape ({width},)")
        if not 0 <= self.epsilon < 2**61:
            raise InputError(f"the integer epsilon must lie in [0, 2^61) (the variance sum adds it in int64), got "
                             f"{self.epsilon}: the input grid is too fine for this epsilon")


def layer_norm_params(gamma: NDArray, beta: NDArray, epsilon: float, input_scale: float, input_zero_point: int,
                      output_scale: float, output_zero_point: int) -> LayerNormParams:
    """The record for ``gamma``, ``beta`` (floats, one per channel) and float ``epsilon``."""
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    width = gamma.shape[0]
    if gamma.shape != (width,) or beta.shape != (width,) or not np.isfinite(gamma).all() or not np.isfinite(beta).all():
        raise InputError(f"gamma and beta must be finite vectors of one length, got {gamma.shape} and {beta.shape}")
    s_in, s_out = float(np.float32(input_scale)), float(np.float32(output_scale))
    pairs = [quantize_multiplier(abs(g) * math.sqrt(width) / (s_out * 2**RSQRT_BITS)) for g in gamma]
    return LayerNormParams(
        int(input_zero_point), int(np.round(epsilon * width**3 / s_in**2)),
        np.sign(gamma).astype(np.int64), np.array([m for m, _ in pairs], np.int32),
        np.array([s for _, s in pairs], np.int32), np.round(beta / s_out).astype(np.int32), int(output_zero_point))


def integer_sqrt(n: NDArray[np.int64]) -> NDArray[np.int64]:
    """``floor(sqrt(n))`` of non-negative int64 values below 2^62, exactly."""
    root = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    root = np.where(root * root > n, root - 1, root)
    root = np.where(root * root > n, root - 1, root)
    root = np.where((root + 1) * (root + 1) <= n, root + 1, root)
    return np.where((root + 1) * (root + 1) <= n, root + 1, root)


def _bit_length(n: NDArray[np.int64]) -> NDArray[np.int64]:
    """Bits of non-negative int64 values (0 for 0), exactly: a float estimate, corrected."""
    bits = np.minimum(np.floor(np.log2(np.maximum(n, 1).astype(np.float64))).astype(np.int64) + 1, 63)
    bits = np.where((bits > 1) & (n < (np.int64(1) << np.maximum(bits - 1, 0))), bits - 1, bits)
    bits = np.where((bits < 63) & (n >= (np.int64(1) << np.minimum(bits, 62))), bits + 1, bits)
    return np.where(n > 0, bits, 0)


def layer_norm(x: NDArray, params: LayerNormParams) -> NDArray:
    """int8 ``[..., E]`` -> int8, or int16 -> int16 (zero points 0), see module docstring."""
    if not isinstance(x, np.ndarray) or x.dtype not in _RANGES:
        raise InputError(f"layer_norm takes an int8 or int16 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    width = params.sign.shape[0]
    if x.shape[-1] != width:
        raise InputError(f"layer_norm was built for {width} channels, got shape {x.shape}")
    if x.dtype == np.int16 and (width > MAX_WIDTH_INT16 or params.input_zero_point or params.output_zero_point):
        raise InputError(f"int16 layer_norm needs zero points 0 and at most {MAX_WIDTH_INT16} channels (its variance "
                         f"sum must fit int64), got {width} channels, zero points {params.input_zero_point} and "
                         f"{params.output_zero_point}")
    centred = x.astype(np.int64) - params.input_zero_point
    deviation = width * centred - centred.sum(axis=-1, keepdims=True)
    variance = (deviation * deviation).sum(axis=-1, keepdims=True) + params.epsilon
    shift = np.maximum(0, (_bit_length(variance) - 27) // 2) if x.dtype == np.int16 else np.zeros_like(variance)
    reduced = np.maximum(variance >> (2 * shift), 1)
    rsqrt = np.where(variance > 0, integer_sqrt((np.int64(1) << (2 * RSQRT_BITS)) // reduced), 0)
    product = deviation * rsqrt
    normalized = np.where(shift > 0, (product + ((np.int64(1) << shift) >> 1)) >> shift, product)
    scaled = multiply_by_quantized_multiplier(normalized, params.multiplier, params.shift).astype(np.int64)
    low, high = _RANGES[x.dtype]
    return np.clip(params.sign * scaled + params.beta + params.output_zero_point, low, high).astype(x.dtype)
