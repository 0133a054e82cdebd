"""oneDNN's int8 GEMM with weights prepacked once, reached from eager code through
``torch.ops.onednn.qlinear_prepack`` / ``qlinear_pointwise``.

Operands: activations as uint8 with zero point 128 (signed codes + 128, the u8 x s8 form
that VNNI's ``vpdpbusd`` and AMX take), weights int8 ``[N, K]`` prepacked into oneDNN's
blocked layout. With unit scales and float32 output the result is ``float(acc)``, where
``acc = sum_k (qx - 128) * w`` is accumulated exactly in int32 (tests pin it to an int64
reference), so the rescale epilogue is shared with the ``torch._int_mm`` path and both
paths give identical bits.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from mixprec.kernels import huge_pages, native
from mixprec.kernels.cpu import cpu_flags

#: Name recorded by modules that run :func:`matmul_u8`.
KERNEL_NAME = "int8 GEMM, int32 accumulation (oneDNN, prepacked weights)"
#: Name of the few-row kernel that reads the packed weight in place (:func:`reads_in_place`).
IN_PLACE_ROWS_KERNEL_NAME = "AVX512-VNNI C++ kernel streaming the packed weight in place"
#: Smallest weight (out x in elements) given to oneDNN. Measured on Zen 4 (AVX512-VNNI,
#: no AMX), ratio to float32: a 4096 x 4096 weight at M = 8 / 32 / 256 ran 11.9x / 7.2x /
#: 5.3x with oneDNN against 2.0x / 2.9x / 4.0x with torch._int_mm (which repacks the weight
#: every call), while for weights up to 1536 x 384 torch._int_mm was faster at every M.
PACKED_MIN_WEIGHTS = 1 << 22
#: CPU flags (Linux /proc/cpuinfo names) under which oneDNN has a native u8 x s8 kernel.
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the prepacked oneDNN int8 GEMM exists and has a native kernel on this CPU
    (without VNNI/AMX oneDNN falls back to a reference kernel that is orders slower)."""
    has_ops = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    return bool(has_ops and cpu_flags() & set(INT8_FLAGS))


def prepack(weight: Tensor) -> Tensor:
    """Pack an int8 ``[N, K]`` weight for :func:`matmul_u8` (an opaque oneDNN tensor)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"prepack takes an int8 [N, K] weight, got {weight.dtype} {tuple(weight.shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
    # PyTorch allocated and oneDNN wrote it: its whole 2 MiB pages into huge pages (decoding streams it)
    huge_pages.collapse_into_huge_pages(torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed))
    return packed


def reads_in_place(weight: Tensor, packed: Tensor) -> bool:
    """Whether the few-row kernel (``csrc/int8_packed_rows.cpp``) can read ``packed``, oneDNN's pack of the
    int8 ``[N, K]`` ``weight``, in place: the native build has it and the packed bytes were checked, one by
    one, to hold the layout it reads (oneDNN's internal layout, not a documented interface)."""
    return native.int8_packed_rows_available() and native.int8_packed_layout_matches(weight.contiguous(), packed)


def unpack(packed: Tensor) -> Tensor:
    """The dense int8 ``[N, K]`` weight a packed tensor holds."""
    return packed.to_dense().t().contiguous()


def _onednn_matmul_u8(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor,
                      source_zero_point: int = 128) -> Tensor:
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, source_zero_point, packed, unit_scale, zero_points, None, 1.0,
                                              0, torch.float32, "none", [], "")


@torch.library.custom_op("mixprec::onednn_matmul_u8", mutates_args=())
def _matmul_u8_operator(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor) -> Tensor:
    return _onednn_matmul_u8(q, packed, unit_scale, zero_points)


@_matmul_u8_operator.register_fake
def _matmul_u8_shape(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor) -> Tensor:  # noqa: ARG001
    return q.new_empty((q.shape[0], unit_scale.shape[0]), dtype=torch.float32)


def matmul_u8(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor) -> Tensor:
    """``float(sum_k (q[m, k] - 128) * w[n, k])`` as float32 ``[M, N]``.

    ``q`` is uint8 ``[M, K]``; ``unit_scale`` float32 ones ``[N]`` and ``zero_points``
    int32 zeros ``[N]`` (kept by the caller so no call allocates them). Under ``torch.compile``
    the call goes through an operator of mixprec's own (``mixprec::onednn_matmul_u8``), which
    runs oneDNN's kernel as eager code does: inductor lowers ``qlinear_pointwise`` itself only
    for a packed weight frozen into the graph as a constant. Eager code calls oneDNN directly
    (the Python operator's dispatch cost about 57 us a call, measured in a 1B model's decode).
    """
    if torch.compiler.is_compiling():
        return _matmul_u8_operator(q, packed, unit_scale, zero_points)
    return _onednn_matmul_u8(q, packed, unit_scale, zero_points)


@torch.library.custom_op("mixprec::onednn_matmul_u8_zp", mutates_args=())
def _matmul_u8_zp_operator(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor,
                           source_zero_point: Tensor) -> Tensor:
    return _onednn_matmul_u8(q, packed, unit_scale, zero_points, int(source_zero_point))


@_matmul_u8_zp_operator.register_fake
def _matmul_u8_zp_shape(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor,  # noqa: ARG001
                        source_zero_point: Tensor) -> Tensor:  # noqa: ARG001
    return q.new_empty((q.shape[0], unit_scale.shape[0]), dtype=torch.float32)


def matmul_u8_zp(q: Tensor, packed: Tensor, unit_scale: Tensor, zero_points: Tensor,
                 source_zero_point: Tensor | int) -> Tensor:
    """``float(sum_k (q[m, k] - z) * w[n, k])`` for a uint8 source zero point ``z`` in [0, 255] (a Python int,
    or a one-element integer tensor under ``torch.compile``): :func:`matmul_u8` with another zero point, exact
    in int32 for the reductions ``int8-asym`` allows (tests pin it to an int64 reference for z in 0..255)."""
    if torch.compiler.is_compiling():
        return _matmul_u8_zp_operator(q, packed, unit_scale, zero_points, torch.as_tensor(source_zero_point))
    return _onednn_matmul_u8(q, packed, unit_scale, zero_points, int(source_zero_point))


def slow_path(out_features: int, in_features: int) -> str | None:
    """Why a dynamic int8 linear of this shape misses the prepacked kernel it would use, or None."""
    if out_features * in_features < PACKED_MIN_WEIGHTS or available():
        return None
    return (f"oneDNN's prepacked int8 GEMM needs {' or '.join(INT8_FLAGS)} (not found); "
            "torch._int_mm repacks this weight on every call")


def prefer_packed(out_features: int, in_features: int) -> bool:
    """Whether a dynamic int8 linear of this shape should hold oneDNN-packed weights."""
    return available() and out_features * in_features >= PACKED_MIN_WEIGHTS
