"""Int4 weights in groups times dynamic int8 activations (``w4a8gN``).

``y[m, n] = sx[m] * sum_g s[n, g] * D[m, n, g] + b[n]``: ``x`` is quantized per row to
int8 codes in [-127, 127] with scale ``sx`` (exactly as the ``int8`` linears do), ``D`` is
the exact integer dot product of a row's codes with the int4 codes ``q`` of group ``g``,
and ``s`` are the fp16 group scales. Native path: one AVX512-VNNI GEMM
(``csrc/w4a8_gemm.cpp``; group sums in float32, one rounding each, in increasing ``g``;
then ``fma(sum, sx, b)``); up to 4 rows (decoding), when K is a multiple of 128 and G of 32,
a kernel that reads the packed codes in place, lanes along K (``csrc/w4a8_rows.h``: 4096 x
4096 at M = 1 with the weight streamed from DRAM, 1.34 -> 0.62 ms), with the same integer
sums and float32 steps. Each row's output depends on that row alone, so a row gives the
same bits in any batch. Fallback (no native build, or no AVX512-VNNI): the weight expanded
to float32 (``q * s`` is exact) times the float32 codes in one matmul, rescaled per row;
it differs from the native path by float32 rounding only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mixprec.kernels import native
from mixprec.kernels.activation_quant import quantize_per_token_symmetric_torch
from mixprec.kernels.weight_only import w4_dequantize_torch

KERNEL_NAME = "int4 weights x dynamic int8 activations: AVX512-VNNI C++ GEMM, int32 per group, float32 group sums"
FALLBACK_KERNEL_NAME = "int4 weights expanded to float32 x int8 activation codes, float32 matmul (PyTorch ops)"


def native_path() -> bool:
    """Whether :func:`w4a8_linear` runs the VNNI kernel here."""
    return native.w4a8_available()


def w4a8_linear_torch(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """PyTorch-op path (and reference) of :func:`w4a8_linear`."""
    codes, row_scale = quantize_per_token_symmetric_torch(x)
    y = F.linear(codes.float(), w4_dequantize_torch(packed, scale)).mul_(row_scale)
    return y.add_(bias) if bias is not None else y


def w4a8_linear(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Int4 x dynamic int8 linear of a contiguous float32 ``x [M, K]`` (see the module docstring)."""
    if native_path() and x.is_contiguous():
        codes, row_scale = native.quantize_rows_s8(x)
        return native.w4a8_linear(codes, row_scale, packed, scale, bias)
    return w4a8_linear_torch(x, packed, scale, bias)
