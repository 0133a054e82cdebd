"""Int8 and 16x8 fully connected layer, TFLite reference semantics (``reference_integer_ops::
FullyConnected`` and ``FullyConnectedPerChannel``).

For each output channel ``c``::

    acc[c] = bias[c] + sum_k (w[c, k] + weight_offset) * (x[k] + input_offset)    (exact, int32)
    out[c] = clamp(MultiplyByQuantizedMultiplier(acc[c], multiplier[c], shift[c]) + output_offset,
                   activation_min, activation_max)

``input_offset = -input_zero_point``; ``weight_offset = 0`` for int8 weights (symmetric);
the rescale is :func:`mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier_single_round`
(one rounding, nearest, ties toward +inf), which is what LiteRT's reference kernel computes.
ReLU/ReLU6 are folded into the clamp bounds.

16x8 (``dtype="int16"``): int16 activations with zero point 0 (both offsets 0), int8 weights,
an int64 (or int32) bias, the accumulator in int64 and the rescale
:func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier_single_round_int64`
(full multiplier, one rounding, ties toward +inf: what LiteRT's 16x8 kernel measured to do),
clamped to the int16 activation range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import (
    multiply_by_quantized_multiplier_single_round,
    multiply_by_quantized_multiplier_single_round_int64,
)
from mixprec.integer.core.tensors import CODE_RANGES, require_array
from mixprec.kernels import native

#: Longest reduction whose int32 accumulator cannot overflow: |x + input_offset| <= 255,
#: |w| <= 128, so K * 255 * 128 + |bias| must stay below 2^31; with |bias| < 2^30 that is K <= 32,896.
MAX_FC_REDUCTION = 32_896
#: The same for 16x8: |x| <= 2^15, |w| <= 2^7 and |bias| < 2^46 keep the int64 accumulator inside
#: the +-2^47 that TFLite's int64 rescale assumes for K <= 2^24.
MAX_WIDE_REDUCTION = 2**24
#: Bias bound of each activation type (the accumulator proofs above).
BIAS_LIMITS = {"int8": 2**30, "int16": 2**46}


@dataclass(frozen=True, eq=False)
class AccumulatorRecord:
    """What the runtime records of FULLY_CONNECTED and the convolutions share: int8 ``weights``,
    a bias or None (int32 for int8 activations; int64 or int32 for 16x8), the input offset, the
    per-channel (or per-tensor) fixed-point rescale and the output offset. Subclasses add
    ``activation_min`` / ``activation_max`` and ``dtype``, the activations' type."""

    weights: NDArray[np.int8]
    bias: NDArray[np.int32] | None
    input_offset: int
    multiplier: NDArray[np.int32]
    shift: NDArray[np.int32]
    output_offset: int

    @cached_property
    def native_constants(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The weights, bias (or None), multiplier and shift as contiguous tensors for the native kernel, made
        on first use (views of the record's arrays where those are contiguous)."""
        def tensor(array: NDArray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array))

        return (tensor(self.weights), None if self.bias is None else tensor(self.bias), tensor(self.multiplier),
                tensor(self.shift))

    def check_accumulator(self, channels: int, reduction: int) -> None:
        """Refuse what cannot hold: a ``reduction`` (products per output) beyond the accumulator
        proof; a bias other than ``[channels]`` int32 (int64 too for 16x8) within the proof's
        bound; ``multiplier`` / ``shift`` other than int32 ``[1]`` or ``[channels]``; offsets
        (0 for 16x8) or an activation range outside the activation type."""
        dtype = self.dtype
        if dtype not in CODE_RANGES:
            raise InputError(f"activations must be int8 or int16, got {dtype!r}")
        longest = MAX_FC_REDUCTION if dtype == "int8" else MAX_WIDE_REDUCTION
        if reduction > longest:
            raise InputError(f"{reduction} products per output exceed {longest}, the longest proven not to "
                             f"overflow the {'int32' if dtype == 'int8' else 'int64'} accumulator")
        bias, bias_types = self.bias, ((np.int32,) if dtype == "int8" else (np.int32, np.int64))
        if bias is not None and (bias.dtype not in bias_types or bias.shape != (channels,)):
            names = " or ".join(np.dtype(b).name for b in bias_types)
            raise InputError(f"bias must be {names} [{channels}], got {bias.dtype} {bias.shape}")
        if bias is not None and np.abs(bias.astype(np.int64)).max(initial=0) >= BIAS_LIMITS[dtype]:
            raise InputError(f"bias values must stay below 2^{BIAS_LIMITS[dtype].bit_length() - 1} in magnitude "
                             "(the accumulator proof)")
        for name in ("multiplier", "shift"):
            value = getattr(self, name)
            if value.dtype != np.int32 or value.shape not in ((1,), (channels,)):
                raise InputError(f"{name} must be int32 [1] or [{channels}], got {value.dtype} {value.shape}")
        if dtype == "int16" and self.shift.max(initial=0) > 7:
            raise InputError(f"the 16x8 rescale takes shifts up to 7 (a real multiplier below 2^7: s_in * s_w / "
                             f"s_out < 128), got {int(self.shift.max())}; widen the output scale")
        if dtype == "int16" and (self.input_offset or self.output_offset):
            raise InputError(f"16x8 activations have zero point 0, got offsets {self.input_offset} and "
                             f"{self.output_offset}")
        if not -255 <= self.input_offset <= 255 or not -128 <= self.output_offset <= 127:
            raise InputError(f"offsets out of range: input {self.input_offset} (need -255..255), "
                             f"output {self.output_offset} (need -128..127)")
        low, high = CODE_RANGES[dtype]
        if not low <= self.activation_min <= self.activation_max <= high:
            raise InputError(f"activation range [{self.activation_min}, {self.activation_max}] is not within "
                             f"[{low}, {high}] or is empty")

    def rescale(self, acc: NDArray[np.int64]) -> NDArray:
        """The accumulator onto the output grid: the type's rescale, the output offset, the clamp."""
        rescale = self.rescale_int64 if self.dtype == "int16" else self.rescale_int32
        scaled = rescale(acc, self.multiplier, self.shift)
        shifted = scaled.astype(np.int64) + self.output_offset
        return np.clip(shifted, self.activation_min, self.activation_max).astype(self.dtype)


@dataclass(frozen=True, eq=False)
class FullyConnectedParams(AccumulatorRecord):
    """Runtime record of a fully connected layer: integers only.

    ``weights`` int8 ``[out, in]``; ``bias`` ``[out]`` or None; ``multiplier`` and ``shift``
    int32 ``[out]`` (per channel) or ``[1]`` (per tensor); ``dtype`` the activations' type.
    """

    activation_min: int = -128
    activation_max: int = 127
    dtype: str = "int8"
    #: The rescales of the int32 (int8) and int64 (16x8) accumulators (see module docstring).
    rescale_int32 = staticmethod(multiply_by_quantized_multiplier_single_round)
    rescale_int64 = staticmethod(multiply_by_quantized_multiplier_single_round_int64)

    def __post_init__(self) -> None:
        if self.weights.dtype != np.int8 or self.weights.ndim != 2:
            raise InputError(f"weights must be a 2-D int8 array, got {self.weights.dtype} {self.weights.shape}")
        out_features, in_features = self.weights.shape
        self.check_accumulator(out_features, in_features)


def fully_connected(x: NDArray, params: FullyConnectedParams) -> NDArray:
    """``x`` ``[..., in]`` of the record's type (int8 or int16) -> the same type ``[..., out]``
    (see module docstring): by mixprec's native kernel (``csrc/tflite_fully_connected.cpp``, the same
    integers) when it is built, else by :func:`fully_connected_reference`."""
    _check_input(x, params)
    if native.available():
        weights, bias, multiplier, shift = params.native_constants
        rows = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, x.shape[-1]))
        out = native.tflite_fully_connected(rows, weights, bias, multiplier, shift, params.input_offset,
                                            params.output_offset, params.activation_min, params.activation_max)
        return out.numpy().reshape(*x.shape[:-1], params.weights.shape[0])
    return fully_connected_reference(x, params)


def fully_connected_reference(x: NDArray, params: FullyConnectedParams) -> NDArray:
    """The numpy statement of :func:`fully_connected`, which the native kernel is pinned to."""
    _check_input(x, params)
    # float64 BLAS over exact integers: every partial sum stays below 2^22 * 2^24 = 2^46 (the reductions
    # these records allow), inside float64's exact range, so the sums are the exact accumulators
    acc = ((x.astype(np.float64) + params.input_offset) @ params.weights.astype(np.float64).T).astype(np.int64)
    if params.bias is not None:
        acc += params.bias
    return params.rescale(acc)


def _check_input(x: NDArray, params: FullyConnectedParams) -> None:
    require_array("fully_connected", x, np.dtype(params.dtype).type)
    in_features = params.weights.shape[1]
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise InputError(f"input shape {x.shape} does not end in {in_features} features")
