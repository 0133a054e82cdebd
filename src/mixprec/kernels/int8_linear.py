"""The dynamic int8 linear as one kernel: per-token quantization, int8 GEMM, rescale."""

from __future__ import annotations

import torch
from torch import Tensor

from mixprec.kernels import native, onednn_int8
from mixprec.kernels.activation_quant import (
    quantize_per_token_symmetric_torch,
    rescale_accumulator_,
    rescale_accumulator_torch,
)
from mixprec.kernels.int8_matmul import int8_matmul


def int8_linear_dynamic_torch(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """PyTorch-op path (and reference) of :func:`int8_linear_dynamic`."""
    q, row_scale = quantize_per_token_symmetric_torch(x)
    return rescale_accumulator_torch(int8_matmul(q, weight.t()), row_scale, weight_scale, bias)


def int8_linear_dynamic(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``y = rescale(int8_matmul(quantize_per_token(x), weight^T))`` for float32 ``x [M, K]``.

    ``weight`` is int8 ``[N, K]`` with float32 per-channel ``weight_scale [N]``; see
    :func:`~mixprec.kernels.activation_quant.quantize_per_token_symmetric_torch` and
    :func:`~mixprec.kernels.activation_quant.rescale_accumulator` for the exact arithmetic.
    The native path does all three steps in one call; both paths give identical bits.
    """
    if native.available() and x.is_contiguous():
        return native.int8_linear_dynamic(x, weight, weight_scale, bias)
    return int8_linear_dynamic_torch(x, weight, weight_scale, bias)


#: Most rows of x that :func:`int8_linear_packed` gives to the kernel reading the packed weight in place.
PACKED_ROWS_MAX = 4


def int8_linear_packed(x: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor, weight_scale: Tensor,
                       bias: Tensor | None, in_place_rows: bool = False) -> Tensor:
    """:func:`int8_linear_dynamic` with the GEMM run by oneDNN on prepacked weights.

    The codes are the same per-token int8 codes shifted by +128 into uint8 (zero point
    128), oneDNN returns ``float(acc)`` exactly, and the same rescale epilogue follows,
    so the output equals :func:`int8_linear_dynamic`'s bit for bit. With ``in_place_rows``
    (the packed layout was checked by :func:`~mixprec.kernels.onednn_int8.reads_in_place`), up to
    :data:`PACKED_ROWS_MAX` rows run mixprec's kernel that streams the packed bytes once
    (``csrc/int8_packed_rows.cpp``: the same exact integer sums and float32 epilogue, the same bits).
    """
    if native.available() and x.is_contiguous():
        q, row_scale = native.quantize_rows_u8(x)
        if in_place_rows and q.shape[0] <= PACKED_ROWS_MAX:
            return native.int8_packed_rows(q, row_scale, packed, weight_scale, bias)
    else:
        q_signed, row_scale = quantize_per_token_symmetric_torch(x)
        q = (q_signed.to(torch.int16) + 128).to(torch.uint8)
    return rescale_accumulator_(onednn_int8.matmul_u8(q, packed, unit_scale, zero_points), row_scale, weight_scale,
                                bias)
