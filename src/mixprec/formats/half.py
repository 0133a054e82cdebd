"""fp16 / bf16 storage conversion.

Rounding is IEEE round-to-nearest-even (what ``Tensor.to`` does on CPU); subnormals of
the target format are kept; NaN stays NaN; finite values whose magnitude rounds beyond
the target's largest finite value become +-inf, and :func:`to_half` counts them so
reports can show them (fp16's largest finite value is 65504; bf16 shares float32's
exponent range, so only float32 values within half an ulp of float32's max overflow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixprec.formats.finite import count_infinite

HALF_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class HalfConversion:
    """A converted tensor and how many finite inputs overflowed to +-inf."""

    tensor: Tensor
    overflow_count: int


def half_dtype(name: str) -> torch.dtype:
    """torch dtype for ``"fp16"`` or ``"bf16"``."""
    try:
        return HALF_DTYPES[name]
    except KeyError:
        raise ValueError(f"half format must be one of {sorted(HALF_DTYPES)}, got {name!r}") from None


def to_half(x: Tensor, dtype: torch.dtype) -> HalfConversion:
    """Round ``x`` to ``dtype`` (float16 or bfloat16), counting finite -> inf overflows."""
    if dtype not in HALF_DTYPES.values():
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    converted = x.detach().to(dtype)
    # Rounding keeps +-inf and NaN as they are, so new infinities are overflows.
    return HalfConversion(tensor=converted, overflow_count=count_infinite(converted) - count_infinite(x))


#: Smallest fp16 normal: scales stored in fp16 are kept at or above it.
FP16_SCALE_MIN = 2.0**-14


def fp16_scale(scale: Tensor) -> Tensor:
    """Round quantization scales to their fp16 storage, returned as float32 values.

    Scales are first raised to :data:`FP16_SCALE_MIN` (so they stay normal); a scale that
    rounds beyond fp16's largest finite value (65504) is refused with ``ValueError``.
    """
    stored = scale.clamp(min=FP16_SCALE_MIN).to(torch.float16)
    if torch.isinf(stored).any():
        raise ValueError(f"scale {float(scale.max()):.6g} exceeds 65504, the largest finite fp16 value")
    return stored.to(torch.float32)
