"""Int8 layer normalization over the last axis, in integers only.

For one row of ``E`` codes ``x`` on ``(s_x, zp_x)``, with ``c = x - zp_x``::

    S   = sum(c)                       d_i = E * c_i - S          (= E * (c_i - mean), exact)
    V   = sum(d_i^2) + eps_q           eps_q = round_half_even(eps * E^3 / s_x^2)   (builder)
    r   = floor(sqrt(floor(2^60 / V)))                            (~ 2^30 / sqrt(V); 0 when V = 0)
    out = clamp(sign_i * MBQM(d_i * r, m_i, shift_i) + beta_q_i + zp_out, -128, 127)

where ``m_i, shift_i = quantize_multiplier(|gamma_i| * sqrt(E) / (s_out * 2^30))`` and
``sign_i = sign(gamma_i)``, ``beta_q_i = round_half_even(beta_i / s_out)`` (the builder's
float work). This is ``gamma * (x - mean) / sqrt(var + eps) + beta`` because
``(x_i - mean) / sqrt(var + eps) = d_i * sqrt(E) / sqrt(V)``. Bounds: ``|d_i| <= sqrt(V)`` so
``|d_i * r| <= 2^30``; ``V < 2^60`` for ``E <= 2^14``, so ``2^60 // V >= 1``. ``MBQM`` is the double-rounding
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
from mixprec.integer.core.tensors import require_array

RSQRT_BITS = 30
MAX_WIDTH = 2**14


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
        if self.epsilon < 0:
            raise InputError(f"the integer epsilon must be >= 0, got {self.epsilon}")


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


def layer_norm(x: NDArray[np.int8], params: LayerNormParams) -> NDArray[np.int8]:
    """int8 ``[..., E]`` -> int8 ``[..., E]`` (see module docstring)."""
    require_array("layer_norm", x, np.int8)
    width = params.sign.shape[0]
    if x.shape[-1] != width:
        raise InputError(f"layer_norm was built for {width} channels, got shape {x.shape}")
    centred = x.astype(np.int64) - params.input_zero_point
    deviation = width * centred - centred.sum(axis=-1, keepdims=True)
    variance = (deviation * deviation).sum(axis=-1, keepdims=True) + params.epsilon
    safe = np.maximum(variance, 1)
    rsqrt = np.where(variance > 0, integer_sqrt((np.int64(1) << (2 * RSQRT_BITS)) // safe), 0)
    scaled = multiply_by_quantized_multiplier(deviation * rsqrt, params.multiplier, params.shift).astype(np.int64)
    out = params.sign * scaled + params.beta + params.output_zero_point
    return np.clip(out, -128, 127).astype(np.int8)
