"""Int8 fully connected layer, TFLite reference semantics (``reference_integer_ops::
FullyConnected`` and ``FullyConnectedPerChannel``).

For each output channel ``c``::

    acc[c] = bias[c] + sum_k (w[c, k] + weight_offset) * (x[k] + input_offset)    (exact, int32)
    out[c] = clamp(MultiplyByQuantizedMultiplier(acc[c], multiplier[c], shift[c]) + output_offset,
                   activation_min, activation_max)

``input_offset = -input_zero_point``; ``weight_offset = 0`` for int8 weights (symmetric);
the rescale is :func:`mixprec.integer.fixedpoint.multiply_by_quantized_multiplier_single_round`
(one rounding, nearest, ties toward +inf), which is what LiteRT's reference kernel computes.
ReLU/ReLU6 are folded into the clamp bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier_single_round
from mixprec.integer.core.tensors import require_array

#: Longest reduction whose int32 accumulator cannot overflow: |x + input_offset| <= 255,
#: |w| <= 128, so K * 255 * 128 + |bias| must stay below 2^31; with |bias| < 2^30 that is K <= 32,896.
MAX_FC_REDUCTION = 32_896


@dataclass(frozen=True, eq=False)
class AccumulatorRecord:
    """What the runtime records of FULLY_CONNECTED and the convolutions share: int8 ``weights``,
    an int32 ``bias`` or None, the input offset, the per-channel (or per-tensor) fixed-point
    rescale and the output offset. Subclasses add ``activation_min`` / ``activation_max``."""

    weights: NDArray[np.int8]
    bias: NDArray[np.int32] | None
    input_offset: int
    multiplier: NDArray[np.int32]
    shift: NDArray[np.int32]
    output_offset: int

    def check_accumulator(self, channels: int) -> None:
        """Refuse a bias, rescale, offsets or activation range that cannot hold: ``bias`` int32
        ``[channels]`` below 2**30 in magnitude (the accumulator proofs), ``multiplier`` /
        ``shift`` int32 ``[1]`` or ``[channels]``."""
        bias = self.bias
        if bias is not None and (bias.dtype != np.int32 or bias.shape != (channels,)):
            raise InputError(f"bias must be int32 [{channels}], got {bias.dtype} {bias.shape}")
        if bias is not None and np.abs(bias.astype(np.int64)).max(initial=0) >= 2**30:
            raise InputError("bias values must stay below 2^30 in magnitude (the accumulator proof)")
        for name in ("multiplier", "shift"):
            value = getattr(self, name)
            if value.dtype != np.int32 or value.shape not in ((1,), (channels,)):
                raise InputError(f"{name} must be int32 [1] or [{channels}], got {value.dtype} {value.shape}")
        if not -255 <= self.input_offset <= 255 or not -128 <= self.output_offset <= 127:
            raise InputError(f"offsets out of range: input {self.input_offset} (need -255..255), "
                             f"output {self.output_offset} (need -128..127)")
        if not -128 <= self.activation_min <= self.activation_max <= 127:
            raise InputError(f"activation range [{self.activation_min}, {self.activation_max}] is not within "
                             "[-128, 127] or is empty")


@dataclass(frozen=True, eq=False)
class FullyConnectedParams(AccumulatorRecord):
    """Runtime record of an int8 fully connected layer: integers only.

    ``weights`` int8 ``[out, in]``; ``bias`` int32 ``[out]`` or None; ``multiplier`` and
    ``shift`` int32 ``[out]`` (per channel) or ``[1]`` (per tensor).
    """

    activation_min: int = -128
    activation_max: int = 127

    def __post_init__(self) -> None:
        out_features, in_features = self.weights.shape
        if self.weights.dtype != np.int8 or self.weights.ndim != 2:
            raise InputError(f"weights must be a 2-D int8 array, got {self.weights.dtype} {self.weights.shape}")
        if in_features > MAX_FC_REDUCTION:
            raise InputError(f"{in_features} input features exceed {MAX_FC_REDUCTION}, the longest reduction "
                             "proven not to overflow the int32 accumulator")
        self.check_accumulator(out_features)


def fully_connected(x: NDArray[np.int8], params: FullyConnectedParams) -> NDArray[np.int8]:
    """``x`` int8 ``[..., in]`` -> int8 ``[..., out]`` (see module docstring)."""
    require_array("fully_connected", x, np.int8)
    in_features = params.weights.shape[1]
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise InputError(f"input shape {x.shape} does not end in {in_features} features")
    acc = (x.astype(np.int64) + params.input_offset) @ params.weights.astype(np.int64).T
    if params.bias is not None:
        acc += params.bias
    scaled = multiply_by_quantized_multiplier_single_round(acc, params.multiplier, params.shift).astype(np.int64)
    return np.clip(scaled + params.output_offset, params.activation_min, params.activation_max).astype(np.int8)
