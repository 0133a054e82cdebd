"""Dynamic activation quantization and accumulator rescaling on the hot path.

Same rounding rule as :func:`mixprec.formats.quantize` (true division by the scale, ties
to even, saturation), specialised to the schemes the int8 linears use. Each function has
a fused C++ path (:mod:`mixprec.kernels.native`) and a PyTorch-op path that is its
reference; tests pin them to each other and to :mod:`mixprec.formats` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixprec.formats import SCALE_MIN
from mixprec.kernels import native


def quantize_per_token_symmetric_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch-op path of :func:`quantize_per_token_symmetric`."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=127.0 * SCALE_MIN).div_(127.0)
    scale = torch.where(torch.isfinite(scale), scale, float("nan"))
    q = x.div(scale).round_().to(torch.int8)
    return q, scale


def quantize_per_token_symmetric(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize rows of a float32 ``x [M, K]`` to int8 in [-127, 127], one scale per row.

    ``scale = max(max|row| / 127, SCALE_MIN)``; ``q = round_half_even(x / scale)``, which
    lies in [-127, 127] without clamping since ``|x| <= 127 * scale`` up to one float
    rounding (which cannot reach 127.5). Returns ``(q, scale [M, 1])``. A row holding NaN
    or +-inf gets scale NaN (its codes are meaningless), which makes its output row NaN.
    """
    if native.available() and x.is_contiguous():
        return native.quantize_rows_s8(x)
    return quantize_per_token_symmetric_torch(x)


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


def quantize_per_tensor(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` as int8."""
    return x.div(scale).round_().add_(zero_point).clamp_(qmin, qmax).to(torch.int8)
