"""Float-to-integer rounding rules used by the integer engine's builders and float32 kernels."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def round_half_away(values: ArrayLike) -> NDArray[np.float32]:
    """``std::round`` / ``TfLiteRound`` of float32 values: nearest, ties away from zero.

    Exact for every float32 (the fraction ``x - trunc(x)`` is exact, so 0.49999997 rounds to
    0, where the common ``floor(|x| + 0.5)`` gives 1). NaN stays NaN, infinities stay."""
    values = np.asarray(values, dtype=np.float32)
    whole = np.trunc(values)
    with np.errstate(invalid="ignore"):  # inf - inf: the step is irrelevant there
        step = (np.abs(values - whole) >= np.float32(0.5)).astype(np.float32)
    return (whole + np.copysign(step, values)).astype(np.float32)
