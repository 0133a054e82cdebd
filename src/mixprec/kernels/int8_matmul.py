"""int8 x int8 -> int32 matrix multiply, with its int64 reference.

Overflow proof: each product of two int8 values has magnitude at most 128 * 128 = 2**14,
so a dot product of length K has magnitude at most K * 2**14, which fits int32
(< 2**31) for K <= 2**17 = 131072. :data:`MAX_REDUCTION` is that bound and both functions
refuse longer reductions instead of wrapping.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Longest reduction (K) whose int8 x int8 dot products provably fit int32.
MAX_REDUCTION = 2**31 // 2**14

#: Name recorded by modules that run :func:`int8_matmul`.
KERNEL_NAME = "int8 GEMM, int32 accumulation (torch._int_mm)"


def _check(a: Tensor, b: Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8 matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"int8 matmul needs [M, K] @ [K, N], got {tuple(a.shape)} @ {tuple(b.shape)}"
        )
    if a.shape[1] > MAX_REDUCTION:
        raise ValueError(
            f"reduction length {a.shape[1]} exceeds {MAX_REDUCTION}, the longest whose "
            "int32 accumulator cannot overflow"
        )


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b`` for int8 ``a [M, K]`` and ``b [K, N]``, as int32 ``[M, N]``.

    ``b`` may be a transposed view of an ``[N, K]`` weight; no copy is made.
    """
    _check(a, b)
    return torch._int_mm(a, b)


def int8_matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Slow, obviously correct ``a @ b`` accumulated in int64, returned as int32."""
    _check(a, b)
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
