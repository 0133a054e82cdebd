"""Dynamic activation quantization and accumulator rescaling on the hot path.

Same rounding rule as :func:`mixprec.formats.quantize` (true division by the scale, ties
to even, saturation), specialised to the schemes the int8 linears use. Each function has
a fused C++ path (:mod:`mixprec.kernels.native`) and a PyTorch-op path that is its
reference; tests pin them to each other and to :mod:`mixprec.formats` bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixprec.formats import SCALE_MIN, QuantSpec
from mixprec.formats.affine import asymmetric_scalar_qparams
from mixprec.kernels import native

#: Activations quantized with one scale and zero point for the whole tensor: asymmetric int8
#: codes in [-128, 127] (the uint8 code is the int8 code + 128).
ACTIVATION_PER_TENSOR = QuantSpec(bits=8, signed=True, symmetric=False, granularity="tensor")


def quantize_per_token_symmetric_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize rows of a float32 ``x [M, K]`` to int8 in [-127, 127], one scale per row.

    ``scale = max(max|row| / 127, SCALE_MIN)``; ``q = round_half_even(x / scale)``, which
    lies in [-127, 127] without clamping since ``|x| <= 127 * scale`` up to one float
    rounding (which cannot reach 127.5). Returns ``(q, scale [M, 1])``. A row holding NaN
    or +-inf gets scale NaN (its codes are meaningless), which makes its output row NaN.
    This is the PyTorch-op path; ``native.quantize_rows_s8`` is the fused one.
    """
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=127.0 * SCALE_MIN).div_(127.0)
    scale = torch.where(torch.isfinite(scale), scale, float("nan"))
    q = x.div(scale).round_().to(torch.int8)
    return q, scale


def rescale_accumulator_torch(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None) -> Tensor:
    """PyTorch-op path of :func:`rescale_accumulator`."""
    y = acc.to(torch.float32).mul_(row_scale).mul_(col_scale)
    return y.add_(bias) if bias is not None else y


def rescale_accumulator(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``y[m, n] = ((float(acc[m, n]) * row_scale[m]) * col_scale[n]) + bias[n]`` in float32.

    Each step rounds to float32 (no fused multiply-add). ``row_scale`` is ``[M, 1]``,
    ``col_scale`` and ``bias`` are ``[N]``.
    """
    if native.available() and acc.is_contiguous():
        return native.rescale_rows_cols(acc, row_scale, col_scale, bias)
    return rescale_accumulator_torch(acc, row_scale, col_scale, bias)


def rescale_accumulator_(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`rescale_accumulator` written over a float32 ``acc`` that the caller owns (one
    buffer instead of two; same bits), returned."""
    if native.available() and acc.is_contiguous():
        return native.rescale_rows_cols_(acc, row_scale, col_scale, bias)
    return rescale_accumulator_torch(acc, row_scale, col_scale, bias)  # in place for float32 too


def quantize_static_torch(x: Tensor, scale: float, zero_point: int) -> tuple[Tensor, Tensor]:
    """PyTorch-op path of :func:`quantize_static`."""
    scaled = x.div(scale)
    nan = torch.isnan(scaled)
    q = scaled.masked_fill_(nan, -256.0).clamp_(-256.0, 256.0).round_().add_(zero_point).clamp_(-128, 127)
    flag = torch.where(nan.any(dim=1, keepdim=True), float("nan"), 1.0)
    return q.to(torch.int8), flag


def quantize_static(x: Tensor, scale: float, zero_point: int) -> tuple[Tensor, Tensor]:
    """Quantize a float32 ``x [M, K]`` with one calibrated scale and zero point.

    ``q = clamp(round_half_even(x / scale) + zero_point, -128, 127)``; +-inf and values
    beyond the calibrated range saturate. Returns ``(q, row_flag [M, 1])`` where the flag
    is 1 for rows without NaN and NaN otherwise: rescaling the accumulator by it turns
    exactly the rows that held NaN into NaN.
    """
    if native.available() and x.is_contiguous():
        return native.quantize_rows_static_s8(x, scale, zero_point)
    return quantize_static_torch(x, scale, zero_point)


def quantize_static_tensors(x: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_static` with the scale and zero point as one-element float32 / int32 tensors (a
    module's buffers, or :func:`dynamic_tensor_qparams_torch`'s results): nothing is read back into Python,
    so ``torch.compile`` keeps it in its graph; the same bits."""
    if native.available() and x.is_contiguous():
        return native.quantize_rows_static_s8_t(x, scale, zero_point)
    return quantize_static_torch(x, scale, zero_point)


def offset_codes(q: Tensor) -> Tensor:
    """int8 codes ``q`` as the uint8 codes ``q + 128`` (zero point 128) that oneDNN's and mixprec's u8 x s8
    kernels take: two's complement with the sign bit flipped, exact."""
    return q.view(torch.uint8) ^ 0x80


def dynamic_tensor_qparams(x: Tensor) -> tuple[float, int, Tensor]:
    """``(scale, int8 zero point, x)`` covering this call's ``x``: ``ACTIVATION_PER_TENSOR``'s
    grid over ``[min(x), max(x)]`` widened to hold 0 (``scale = (max' - min') / 255``, never
    below ``SCALE_MIN``; ``zero_point = clamp(-128 - round_half_even(min' / scale), -128, 127)``,
    float32 arithmetic). Only finite values set the range; when ``x`` holds +-inf, the
    returned ``x`` has them replaced by NaN, so the tokens or samples holding them come out
    NaN instead of saturating. Reads two scalars back from the tensor (a host sync).
    """
    low, high = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(low) and math.isfinite(high)):
        finite = torch.isfinite(x)
        x = torch.where(finite, x, float("nan"))
        kept = x[finite]
        low, high = (float(v) for v in torch.aminmax(kept)) if kept.numel() else (0.0, 0.0)
    scale, zero_point = asymmetric_scalar_qparams(low, high, ACTIVATION_PER_TENSOR)
    return scale, zero_point, x


def dynamic_tensor_qparams_torch(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`dynamic_tensor_qparams` in tensor operations only (0-dim ``scale`` and ``zero_point``,
    no host sync, for ``torch.compile``): the same float32 roundings, the same bits."""
    finite = torch.isfinite(x)
    x = torch.where(finite, x, float("nan"))
    low = torch.where(finite, x, float("inf")).amin().clamp(max=0.0)
    high = torch.where(finite, x, float("-inf")).amax().clamp(min=0.0)
    span = float(ACTIVATION_PER_TENSOR.qmax - ACTIVATION_PER_TENSOR.qmin)
    scale = ((high - low) / span).clamp(min=SCALE_MIN)
    qmin, qmax = ACTIVATION_PER_TENSOR.qmin, ACTIVATION_PER_TENSOR.qmax
    zero_point = (qmin - torch.round(low / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point, x
