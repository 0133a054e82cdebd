"""Weight-only int8 linear: ``y = (x @ W_q^T) * s_w + b`` with float32 activations.

Two paths, chosen per call by shape (measured on Zen 4, ratio to a float32 matmul):
- few rows on a big weight: a fused C++ GEMV that reads each int8 weight row once and
  converts it on the fly (4096 x 4096: 2.1x at M = 1, 1.7x at M = 4, 0.7x at M = 8);
- otherwise: convert the int8 codes exactly to float32, one matmul, then rescale (0.13-0.6x:
  it pays a full float32 weight per call).
Both accumulate in float32; the order of the sum differs, so results differ by rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixprec.kernels import native

#: Largest row count M given to the GEMV.
ROWS_KERNEL_MAX_M = 4
#: Smallest weight (out x in elements) given to the GEMV; below it the float32 path was faster.
ROWS_KERNEL_MIN_WEIGHTS = 1 << 20

KERNEL_NAME = (f"int8 weights: fused C++ GEMV for M <= {ROWS_KERNEL_MAX_M} on weights >= 2**20 elements, "
               "else float32 expansion + matmul, per-channel rescale")


def w8_linear_expand(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Float32 path: ``F.linear(x, float(W_q)) * s_w + b``."""
    y = F.linear(x, weight.to(torch.float32)).mul_(scale)
    return y.add_(bias) if bias is not None else y


def w8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Weight-only int8 linear of a contiguous float32 ``x [M, K]`` (see module docstring)."""
    if (x.shape[0] <= ROWS_KERNEL_MAX_M and weight.numel() >= ROWS_KERNEL_MIN_WEIGHTS and native.available()
            and x.is_contiguous()):
        return native.w8_linear_rows(x, weight, scale, bias)
    return w8_linear_expand(x, weight, scale, bias)
