"""Int8 and int16 (16x8) MEAN over non-batch axes with LiteRT's reference semantics
(``reference_ops::QuantizedMeanOrSum``, which its reference MEAN kernel uses for every int8
case). Integers only; ``1/count`` is folded into the output multiplier::

    multiplier, shift = quantize_multiplier(double(s_in) / double(s_out))
    k = min(floor(log2(count)), 32, 31 + shift)             # headroom taken from the multiplier
    multiplier = (multiplier * 2^k) // count                # truncating (both positive)
    shift = shift - k
    out = clamp(MBQM(sum(q) - zp_in * count, multiplier, shift) + zp_out, lo, hi)

with :func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier` (two roundings, ties
away from zero), ``[lo, hi]`` the type's range. The sum is exact and inside int32: at most 2^23
int8 elements per output (``|sum - zp_in * count| <= 255 * 2^23``), or 2^16 int16 ones; mixprec's
native kernel sums over consecutive axes (``csrc/tflite_reduce.cpp``), numpy over others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier
from mixprec.integer.core.tensors import CODE_RANGES, require_array
from mixprec.kernels import native

MAX_MEAN_COUNT = 2**23
#: The most elements per output whose int32 sum is exact, per activation type.
MAX_MEAN_COUNTS = {"int8": MAX_MEAN_COUNT, "int16": 2**16}


@dataclass(frozen=True)
class MeanParams:
    """Runtime record of MEAN: the reduced ``axes`` (sorted, never 0), ``keep_dims``, the
    element ``count`` per output, and the folded ``multiplier``/``shift`` (integers only)."""

    axes: tuple[int, ...]
    keep_dims: bool
    count: int
    input_zero_point: int
    output_zero_point: int
    multiplier: int
    shift: int
    dtype: str = "int8"

    def __post_init__(self) -> None:
        if not 0 <= self.multiplier < 2**31 or not -31 <= self.shift <= 30:
            raise InputError(f"MEAN's multiplier lies in [0, 2^31) with a shift in [-31, 30], got {self.multiplier} "
                             f"and {self.shift}")


def mean_params(shape: tuple[int, ...], axes: tuple[int, ...], keep_dims: bool, input_scale: float,
                input_zero_point: int, output_scale: float, output_zero_point: int,
                dtype: str = "int8") -> MeanParams:
    """The record LiteRT's ``Prepare`` and ``Eval`` compute for a MEAN over ``axes`` of ``shape``."""
    axes = tuple(sorted(set(int(a) for a in axes)))
    if not axes or any(not 1 <= a < len(shape) for a in axes):
        raise InputError(f"MEAN reduces axes among 1..{len(shape) - 1} (axis 0 is the batch), got {axes}")
    count = int(np.prod([shape[a] for a in axes]))
    if dtype not in MAX_MEAN_COUNTS:
        raise InputError(f"MEAN runs on int8 or int16, got {dtype!r}")
    if count > MAX_MEAN_COUNTS[dtype]:
        raise InputError(f"MEAN over {count} {dtype} elements exceeds {MAX_MEAN_COUNTS[dtype]}, the most whose int32 "
                         "sum is exact")
    multiplier, shift = quantize_multiplier(float(np.float32(input_scale)) / float(np.float32(output_scale)))
    headroom = min(count.bit_length() - 1, 32, 31 + shift)
    return MeanParams(axes, keep_dims, count, int(input_zero_point), int(output_zero_point),
                      (multiplier << headroom) // count, shift - headroom, dtype)


def exact_sums(q: NDArray, axes: tuple[int, ...]) -> NDArray[np.int64]:
    """Exact sums of ``q`` over ``axes``: by the native kernel when the axes are consecutive (``q``
    viewed as ``[outer, middle, inner]``), else by numpy in int64 (without an int64 copy of ``q``)."""
    if native.available() and _consecutive(axes):
        outer, inner = int(np.prod(q.shape[:axes[0]])), int(np.prod(q.shape[axes[-1] + 1:]))
        grouped = torch.from_numpy(np.ascontiguousarray(q).reshape(outer, -1, inner))
        return native.tflite_sum_middle(grouped).numpy().astype(np.int64).reshape(mean_shape(q.shape, axes, False))
    return q.sum(axis=axes, dtype=np.int64)


def _consecutive(axes: tuple[int, ...]) -> bool:
    """Whether sorted ``axes`` are consecutive (the native kernels' ``[outer, middle, inner]`` view)."""
    return axes == tuple(range(axes[0], axes[-1] + 1))


def mean_shape(shape: tuple[int, ...], axes: tuple[int, ...], keep_dims: bool) -> tuple[int, ...]:
    """Output shape of MEAN over ``axes``."""
    if keep_dims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _check_input(q: NDArray, params: MeanParams) -> None:
    require_array("mean", q, np.dtype(params.dtype).type)
    count = int(np.prod([q.shape[a] for a in params.axes])) if q.ndim > max(params.axes) else -1
    if count != params.count:
        raise InputError(f"mean over axes {params.axes} was built for {params.count} elements per output; "
                         f"shape {q.shape} gives {count}")


def mean(q: NDArray, params: MeanParams) -> NDArray:
    """``q`` -> its mean over ``params.axes``, int8 or int16 as the record says (see module docstring): by
    mixprec's native kernel (``csrc/tflite_reduce.cpp``) when it is built and the axes are consecutive,
    else by :func:`mean_reference`."""
    _check_input(q, params)
    if native.available() and _consecutive(params.axes):
        outer, inner = int(np.prod(q.shape[:params.axes[0]])), int(np.prod(q.shape[params.axes[-1] + 1:]))
        grouped = torch.from_numpy(np.ascontiguousarray(q).reshape(outer, -1, inner))
        codes = native.tflite_mean_middle(grouped, params.input_zero_point * params.count, params.multiplier,
                                          params.shift, params.output_zero_point, *CODE_RANGES[params.dtype])
        return codes.numpy().reshape(mean_shape(q.shape, params.axes, params.keep_dims))
    return mean_reference(q, params)


def mean_reference(q: NDArray, params: MeanParams) -> NDArray:
    """The numpy statement of :func:`mean` (exact int64 sums, the rescale of
    :mod:`~mixprec.integer.core.fixedpoint`), which the native kernel is pinned to."""
    _check_input(q, params)
    total = q.sum(axis=params.axes, dtype=np.int64).reshape(mean_shape(q.shape, params.axes, params.keep_dims))
    scaled = multiply_by_quantized_multiplier(total - params.input_zero_point * params.count, params.multiplier,
                                              params.shift).astype(np.int64)
    return np.clip(scaled + params.output_zero_point, *CODE_RANGES[params.dtype]).astype(params.dtype)
