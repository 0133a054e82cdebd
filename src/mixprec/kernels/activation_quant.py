"""Dynamic activation quantization on the hot path.

Same rounding rule as :func:`mixprec.formats.quantize` (true division by the scale, ties
to even, saturation) specialised to the two activation schemes the int8 linears use, so
that tests can pin these fast paths to the general one bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixprec.formats import SCALE_MIN


def quantize_per_token_symmetric(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize rows of ``x [M, K]`` to int8 in [-127, 127], one scale per row.

    ``scale = max(max|row| / 127, SCALE_MIN)``;
    ``q = round_half_even(x / scale)``, which lies in [-127, 127] without clamping since
    ``|x| <= 127 * scale`` up to one float rounding (which cannot reach 127.5).
    Returns ``(q, scale [M, 1])``. A row holding NaN or Inf gets a NaN/Inf scale (its
    codes are then meaningless), and multiplying the accumulator by it makes the row's
    output non-finite.
    """
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=127.0 * SCALE_MIN).div_(127.0)
    q = x.div(scale).round_().to(torch.int8)
    return q, scale


def quantize_per_tensor(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` as int8."""
    return x.div(scale).round_().add_(zero_point).clamp_(qmin, qmax).to(torch.int8)
