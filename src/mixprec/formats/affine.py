"""Affine integer quantization: parameters, quantize and dequantize.

Rounding rule (the only one mixprec uses for float -> int):

    q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)

``x / scale`` is a true float32 division (not a multiply by a reciprocal), rounding is
``torch.round`` (ties to even), and values beyond the representable range, including
+-inf, saturate to qmin/qmax. NaN has no integer image: :func:`quantize` refuses it.

Dequantization is ``(q - zero_point) * scale`` with the subtraction exact in int32 and a
single float32 rounding in the multiply.

Parameter layout by granularity, for a tensor ``x``:

- ``tensor``: ``scale`` and ``zero_point`` are 0-d.
- ``channel``: shape ``(x.shape[axis],)``.
- ``group``: shape ``x.shape[:-1] + (x.shape[-1] // group_size,)``; group ``j`` of a row
  holds elements ``j*group_size .. (j+1)*group_size - 1`` of the last axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mixprec.formats.finite import all_finite
from mixprec.formats.spec import QuantSpec

#: Smallest scale ever produced: the smallest normal float32, so ``x / scale`` and
#: ``q * scale`` never lose precision to subnormals.
SCALE_MIN = 2.0**-126


@dataclass(frozen=True)
class QParams:
    """Quantization parameters for one tensor: a spec with its scales and zero points.

    ``scale`` is float32 and ``zero_point`` int32, both of the granularity's parameter
    shape (see module docstring).
    """

    spec: QuantSpec
    scale: Tensor
    zero_point: Tensor

    def __post_init__(self) -> None:
        if self.scale.dtype != torch.float32 or self.zero_point.dtype != torch.int32:
            raise ValueError(
                f"QParams needs float32 scale and int32 zero_point, got {self.scale.dtype} "
                f"and {self.zero_point.dtype}"
            )
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} differs from zero_point shape "
                f"{tuple(self.zero_point.shape)}"
            )


def integer_dtype(spec: QuantSpec) -> torch.dtype:
    """Storage dtype of unpacked integer codes: int8 if signed, else uint8."""
    return torch.int8 if spec.signed else torch.uint8


def param_shape(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of ``scale``/``zero_point`` for a tensor of ``shape`` under ``spec``."""
    shape = tuple(shape)
    if spec.granularity == "tensor":
        return ()
    if not shape:
        raise ValueError(f"{spec.granularity} granularity needs a tensor of rank >= 1")
    if spec.granularity == "channel":
        return (shape[_channel_axis(len(shape), spec.axis)],)
    group = spec.group_size
    assert group is not None
    if shape[-1] % group:
        divisors = [d for d in range(2, shape[-1] + 1, 2) if shape[-1] % d == 0]
        raise ValueError(
            f"group_size {group} does not divide the last dimension ({shape[-1]}); "
            f"even group sizes that divide it: {divisors[:12] or 'none'}"
        )
    return shape[:-1] + (shape[-1] // group,)


def _channel_axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def slice_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``x`` as ``[S, L]``: one row per parameter slot (S = numel of param_shape)."""
    pshape = param_shape(x.shape, spec)
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "channel":
        return x.movedim(_channel_axis(x.dim(), spec.axis), 0).reshape(pshape[0], -1)
    return x.reshape(-1, spec.group_size)


def _broadcast(param: Tensor, x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Return (x reshaped for the granularity, param reshaped to broadcast against it)."""
    if spec.granularity == "tensor":
        return x, param
    if spec.granularity == "channel":
        axis = _channel_axis(x.dim(), spec.axis)
        shape = [1] * x.dim()
        shape[axis] = -1
        return x, param.reshape(shape)
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
    return grouped, param.unsqueeze(-1)


def qparams_from_range(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> QParams:
    """Parameters whose grid covers ``[min_val, max_val]`` (and always 0) per slot.

    Symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, zero point fixed.
    Asymmetric: ``scale = (max' - min') / (qmax - qmin)`` with ``min' = min(min, 0)``,
    ``max' = max(max, 0)``, and ``zero_point = clamp(qmin - round(min' / scale))``, so 0
    is exactly representable. Scales never fall below :data:`SCALE_MIN` (an all-zero
    range gets exactly SCALE_MIN).
    """
    min_val = min_val.detach().to(torch.float32)
    max_val = max_val.detach().to(torch.float32)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("quantization range holds NaN or Inf; only finite ranges have a grid")
    if (min_val > max_val).any():
        raise ValueError("quantization range has min > max")
    span = float(spec.qmax - spec.qmin)
    if spec.symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = amax / (span / 2)
        zero_point = torch.full_like(scale, spec.symmetric_zero_point, dtype=torch.int32)
    else:
        lo = torch.clamp(min_val, max=0.0)
        hi = torch.clamp(max_val, min=0.0)
        scale = (hi - lo) / span
    scale = scale.clamp(min=SCALE_MIN)
    if not spec.symmetric:
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
        zero_point = zero_point.to(torch.int32)
    return QParams(spec=spec, scale=scale, zero_point=zero_point)


def asymmetric_scalar_qparams(low: float, high: float, spec: QuantSpec) -> tuple[float, int]:
    """:func:`qparams_from_range` of one finite asymmetric range in float32 scalar arithmetic
    (the same roundings; no tensor ops, for per-call activation ranges): ``(scale, zero_point)``."""
    if spec.symmetric or not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"needs a finite range low <= high and an asymmetric spec, got [{low}, {high}], {spec}")
    lo, hi = np.float32(min(low, 0.0)), np.float32(max(high, 0.0))
    scale = max(np.float32(hi - lo) / np.float32(spec.qmax - spec.qmin), np.float32(SCALE_MIN))
    zero_point = min(max(spec.qmin - int(np.round(np.float32(lo / scale))), spec.qmin), spec.qmax)
    return float(scale), zero_point


def minmax(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-slot minimum and maximum of ``x``, in the granularity's parameter shape."""
    pshape = param_shape(x.shape, spec)
    rows = slice_view(x.detach().to(torch.float32), spec)
    return rows.amin(dim=1).reshape(pshape), rows.amax(dim=1).reshape(pshape)


def qparams_from_tensor(x: Tensor, spec: QuantSpec) -> QParams:
    """Min/max parameters computed from ``x`` itself (what weights use)."""
    if not all_finite(x):
        raise ValueError("tensor holds NaN or Inf; quantization needs finite values")
    return qparams_from_range(*minmax(x, spec), spec)


def quantize(x: Tensor, qparams: QParams) -> Tensor:
    """Integer codes of ``x``: int8 tensor if the spec is signed, else uint8.

    ``q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)``; +-inf and
    out-of-range values saturate. Raises ``ValueError`` on NaN.
    """
    spec = qparams.spec
    if torch.isnan(x).any():
        raise ValueError(f"cannot quantize NaN ({int(torch.isnan(x).sum())} values)")
    expected = param_shape(x.shape, spec)
    if tuple(qparams.scale.shape) != expected:
        raise ValueError(
            f"qparams have shape {tuple(qparams.scale.shape)} but a tensor of shape "
            f"{tuple(x.shape)} needs {expected} for {spec.granularity} granularity"
        )
    xv, scale = _broadcast(qparams.scale, x.to(torch.float32), spec)
    _, zero_point = _broadcast(qparams.zero_point, x, spec)
    q = xv / scale  # the only full-size float temporary: the steps below run in place
    q.round_().add_(zero_point).clamp_(spec.qmin, spec.qmax)
    return q.to(integer_dtype(spec)).reshape(x.shape)


def dequantize(q: Tensor, qparams: QParams) -> Tensor:
    """Float32 values ``(q - zero_point) * scale`` of integer codes ``q``."""
    spec = qparams.spec
    qv, scale = _broadcast(qparams.scale, q, spec)
    _, zero_point = _broadcast(qparams.zero_point, q, spec)
    x = (qv.to(torch.int32) - zero_point).to(torch.float32) * scale
    return x.reshape(q.shape)


def fake_quantize(x: Tensor, qparams: QParams) -> Tensor:
    """``dequantize(quantize(x))``: the float values the integer grid can represent."""
    return dequantize(quantize(x, qparams), qparams)
