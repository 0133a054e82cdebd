"""Finiteness checks that allocate no full-size temporaries.

``torch.isfinite`` builds several full-size temporaries (7 bytes per element measured
for float32), which would dominate the extra memory of quantizing a large layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements inspected at once by :func:`count_infinite`.
CHUNK_ELEMENTS = 1 << 16


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN and no +-inf (always true for integer tensors).

    Uses ``torch.aminmax``: a NaN anywhere makes both results NaN, an infinity shows in one.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def count_infinite(x: Tensor) -> int:
    """Number of +-inf elements of ``x``, counted a chunk at a time."""
    if not x.is_floating_point():
        return 0
    return sum(int(torch.isinf(chunk).sum()) for chunk in x.detach().reshape(-1).split(CHUNK_ELEMENTS))
