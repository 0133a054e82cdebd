"""The dynamic int8 linear as one kernel: per-token quantization, int8 GEMM, rescale."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from mixprec.kernels import cpu, native, onednn_int8
from mixprec.kernels.activation_quant import (
    offset_codes,
    quantize_per_token_symmetric_torch,
    quantize_static_tensors,
    rescale_accumulator,
    rescale_accumulator_,
    rescale_accumulator_torch,
)
from mixprec.kernels.int8_matmul import int8_matmul

#: Most rows of x given to the few-row kernels (dense weights, and packed ones read in place).
PACKED_ROWS_MAX = 4
#: Smallest dense weight (elements) given to the few-row kernel: measured at M = 1 (40 layers in turn,
#: 2 threads), 256 x 2048 ran 22-27 us against 42-52 us in ``torch._int_mm`` and 576 x 576 26-28 against
#: 36-37, while 192 x 576 ran 9-13 against 7-9.
DENSE_ROWS_MIN_WEIGHTS = 1 << 18


def int8_linear_dynamic_torch(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """PyTorch-op path (and reference) of :func:`int8_linear_dynamic`."""
    q, row_scale = quantize_per_token_symmetric_torch(x)
    return rescale_accumulator_torch(int8_matmul(q, weight.t()), row_scale, weight_scale, bias)


def int8_linear_dynamic(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``y = rescale(int8_matmul(quantize_per_token(x), weight^T))`` for float32 ``x [M, K]``.

    ``weight`` is int8 ``[N, K]`` with float32 per-channel ``weight_scale [N]``; see
    :func:`~mixprec.kernels.activation_quant.quantize_per_token_symmetric_torch` and
    :func:`~mixprec.kernels.activation_quant.rescale_accumulator` for the exact arithmetic.
    The native path does all three steps in one call, and up to :data:`PACKED_ROWS_MAX` rows
    (weights of :data:`DENSE_ROWS_MIN_WEIGHTS` elements and more) stream the weight once in
    mixprec's VNNI (or, without it, AVX2) kernel (``csrc/int8_dense_rows.cpp``) instead of ``torch._int_mm``, which
    repacks it every call; every path gives identical bits.
    """
    if native.available() and x.is_contiguous():
        if _dense_rows_apply(x, weight):
            q, row_scale = native.quantize_rows_u8(x)
            return native.int8_dense_rows(q, row_scale, weight, weight_scale, bias)
        return native.int8_linear_dynamic(x, weight, weight_scale, bias)
    return int8_linear_dynamic_torch(x, weight, weight_scale, bias)


def dense_rows_note(weight: Tensor) -> str:
    """The kernel-name suffix for a dense int8 ``weight`` whose few-row calls stream it once ('' if they do not)."""
    if weight.numel() < DENSE_ROWS_MIN_WEIGHTS or not native.int8_dense_rows_available():
        return ""
    if "avx512_vnni" in cpu.cpu_flags():
        return f"; up to {PACKED_ROWS_MAX} rows: AVX512-VNNI C++ kernel streaming the weight once"
    return f"; AVX2 C++ kernel streaming the weight once per {PACKED_ROWS_MAX} rows"


@torch.compiler.assume_constant_result
def _onednn_int8_gemm() -> bool:
    """Whether oneDNN's int8 GEMM has a VNNI/AMX kernel here (a constant in compiled graphs)."""
    return onednn_int8.available()


def dense_rows_max(weight: Tensor) -> int:
    """Most rows of ``x`` whose linear against the dense int8 ``weight`` runs the kernel that streams it once per four
    rows (0: none): :data:`PACKED_ROWS_MAX`, or every count (``sys.maxsize``) where oneDNN's int8 GEMM has no
    VNNI/AMX kernel (measured on an AVX2-only CPU, 128 x 2048 rows against a 5632 x 2048 weight: 72 ms, against 810
    ms in ``torch._int_mm`` and 72 ms for float32; ``benchmarks/int8_many_rows.py``)."""
    if (weight.numel() < DENSE_ROWS_MIN_WEIGHTS or not weight.is_contiguous()
            or not native.int8_dense_rows_available()):
        return 0
    return PACKED_ROWS_MAX if _onednn_int8_gemm() else sys.maxsize


def _dense_rows_apply(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x``'s rows go to the kernel that streams the dense int8 ``weight`` once (:func:`dense_rows_max`)."""
    return 1 <= x.shape[0] <= dense_rows_max(weight)


def int8_linear_static(x: Tensor, input_scale: Tensor, input_zero_point: Tensor, weight: Tensor,
                       combined_scale: Tensor, bias: Tensor) -> Tensor:
    """The ``int8-static`` linear of float32 ``x [M, K]``: ``q = clamp(round_half_even(x / s_x) + z_x, -128,
    127)`` (:func:`~mixprec.kernels.activation_quant.quantize_static_tensors`; ``input_scale`` and
    ``input_zero_point`` one-element float32 / int32 tensors), the exact int32 ``acc = sum_k q * w`` against the
    int8 ``weight [N, K]``, then ``((acc * flag) * combined_scale) + bias`` in float32 (``flag`` 1, or NaN for a
    row holding NaN; the zero point's term is folded into ``bias``). Up to :data:`PACKED_ROWS_MAX` rows with a
    weight of :data:`DENSE_ROWS_MIN_WEIGHTS` elements and more run the few-row kernel that streams the weight once
    (``csrc/int8_dense_rows.cpp``, fed ``q + 128`` as uint8 with zero point 128: the same sums, the same bits)
    instead of ``torch._int_mm``, which repacks it every call."""
    q, row_flag = quantize_static_tensors(x, input_scale, input_zero_point)
    if _dense_rows_apply(q, weight):
        return native.int8_dense_rows(offset_codes(q), row_flag, weight, combined_scale, bias)
    return rescale_accumulator(int8_matmul(q, weight.t()), row_flag, combined_scale, bias)


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
        q = offset_codes(q_signed)
    return rescale_accumulator_(onednn_int8.matmul_u8(q, packed, unit_scale, zero_points), row_scale, weight_scale,
                                bias)


def int8_linear_static_packed(x: Tensor, input_scale: Tensor, input_zero_point: Tensor, packed: Tensor,
                              unit_scale: Tensor, zero_points: Tensor, combined_scale: Tensor, bias: Tensor,
                              in_place_rows: bool = False) -> Tensor:
    """:func:`int8_linear_static` with the GEMM run by oneDNN on prepacked weights (see
    :func:`int8_linear_packed` for the operands): the calibrated codes + 128 as uint8 with zero point 128 give
    the same exact int32 sums, and the same float32 rescale follows, so the bits are
    :func:`int8_linear_static`'s; up to :data:`PACKED_ROWS_MAX` rows read the packed bytes in place when
    ``in_place_rows``."""
    q, row_flag = quantize_static_tensors(x, input_scale, input_zero_point)
    offset = offset_codes(q)
    if native.available() and in_place_rows and q.shape[0] <= PACKED_ROWS_MAX:
        return native.int8_packed_rows(offset, row_flag, packed, combined_scale, bias)
    return rescale_accumulator_(onednn_int8.matmul_u8(offset, packed, unit_scale, zero_points), row_flag,
                                combined_scale, bias)

