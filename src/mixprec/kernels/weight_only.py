"""Weight-only linears with float32 activations: int8 (``w8``) and int4 in groups (``w4gN``).

``w8``: ``y = (x @ W_q^T) * s_w + b``. Two paths, chosen per call by shape (measured on
Zen 4, ratio to a float32 matmul):
- up to 64 rows: a fused C++ kernel that reads the int8 weight once per call
  and converts it in registers, 4 output channels x 6 rows per block, over both cores
  (4096 x 4096, weight warm in the L3 cache: 7.9x at M = 1, 8.4x at M = 4, 3.7x at M = 8,
  1.5x at M = 64; each row's output is the same bits in any batch);
- otherwise: convert the int8 codes exactly to float32, one matmul, then rescale (0.13-0.6x:
  it pays a full float32 weight per call).
Both accumulate in float32; the order of the sum differs, so results differ by rounding.

``w8gN``: ``y = x @ (q * s)^T + b`` with fp16 group scales; the same two paths, the fused
kernel scaling each chunk of 16 converted codes by its group's scale (exact) before the
multiply-adds, for group sizes that are multiples of 16.

``w4gN``: ``y = x @ (q * s)^T + b`` with int4 codes ``q`` and fp16 group scales ``s``
(``q * s`` is exact in float32). Two paths (4096 x 4096, ratio to float32):
- M <= 16: a fused C++ kernel that unpacks codes in registers and reads the weight at half
  a byte per element (3.2x at M = 1, 5x at M = 4, 2x at M = 8, 1.1x at M = 16, weight warm in
  the L3; streamed from DRAM, 24 such layers in turn: 0.58-0.62 ms a layer at M = 1, 15-16 GB/s);
- otherwise: the weight is expanded to float32 in tiles of at most 2**22 elements (16 MiB,
  one buffer reused) and each tile multiplied in float32 (0.85-1.05x float32: the
  float32 matmul bounds it; no whole float32 copy of the weight is ever held).
Without the native build both are a PyTorch expansion of the whole weight. On CPUs without AVX-512
the fused kernels of all three run in AVX2's 8 lanes (``csrc/avx2_lanes.h``; group sizes that are
multiples of 32 for ``w4gN``), the same algorithm with shorter vectors, so their sums round in
another order (BENCHMARKS.md: "Decoding on a CPU without AVX-512").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixprec.formats import unpack_int4
from mixprec.kernels import native

#: Largest row count M given to the fused kernels of ``w8`` and ``w8gN`` (measured faster than
#: the float32 paths up to here, from 576 x 576 to 4096 x 4096 weights).
ROWS_KERNEL_MAX_M = 64

KERNEL_NAME = (f"int8 weights: fused C++ kernel for M <= {ROWS_KERNEL_MAX_M}, "
               "else float32 expansion + matmul, per-channel rescale")


def w8_linear_expand(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Float32 path: ``F.linear(x, float(W_q)) * s_w + b``."""
    y = F.linear(x, weight.to(torch.float32)).mul_(scale)
    return y.add_(bias) if bias is not None else y


def w8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Weight-only int8 linear of a contiguous float32 ``x [M, K]`` (see module docstring)."""
    if x.shape[0] <= ROWS_KERNEL_MAX_M and native.available() and x.is_contiguous():
        return native.w8_linear_rows(x, weight, scale, bias)
    return w8_linear_expand(x, weight, scale, bias)


#: Largest row count M given to the fused int4 kernel.
W4_ROWS_KERNEL_MAX_M = 16
#: Most float32 elements of one expanded weight tile.
W4_TILE_ELEMENTS = 1 << 22

W4_KERNEL_NAME = (f"int4 weights: fused C++ kernel for M <= {W4_ROWS_KERNEL_MAX_M}, else float32 expansion "
                  "in 16 MiB tiles + float32 matmul")
W4_FALLBACK_KERNEL_NAME = "int4 weights expanded to float32 (PyTorch ops), float32 matmul"


def w4_dequantize_torch(packed: Tensor, scale: Tensor) -> Tensor:
    """The float32 weight ``[N, K]`` of int4 codes ``packed [N, K/2]`` and fp16 group scales ``scale [N, K/G]``."""
    codes = unpack_int4(packed, signed=True).to(torch.float32)
    out_features, groups = scale.shape
    return (codes.view(out_features, groups, -1) * scale.to(torch.float32).unsqueeze(-1)).view(out_features, -1)


def tile_rows(out_features: int, in_features: int) -> int:
    """Output rows of one expanded weight tile: at most :data:`W4_TILE_ELEMENTS` float32 elements, at least one row."""
    return max(1, min(out_features, W4_TILE_ELEMENTS // in_features))


def w4_linear_tiled(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Float32 matmul against the int4 weight expanded tile by tile (output rows of the weight)."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    rows_per_tile = tile_rows(out_features, in_features)
    buffer = torch.empty(rows_per_tile, in_features)
    y = torch.empty(x.shape[0], out_features)
    for begin in range(0, out_features, rows_per_tile):
        rows = min(rows_per_tile, out_features - begin)
        tile = buffer[:rows]
        native.w4_dequantize_rows(packed, scale, begin, tile)
        y[:, begin:begin + rows] = F.linear(x, tile, None if bias is None else bias[begin:begin + rows])
    return y


def w4_linear(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Int4 weight-only linear of a contiguous float32 ``x [M, K]`` (see module docstring)."""
    if not native.available():
        return F.linear(x, w4_dequantize_torch(packed, scale), bias)
    if x.shape[0] <= W4_ROWS_KERNEL_MAX_M:
        return native.w4_linear_rows(x, packed, scale, bias)
    return w4_linear_tiled(x, packed, scale, bias)


W8G_KERNEL_NAME = (f"int8 weights in groups: fused C++ kernel for M <= {ROWS_KERNEL_MAX_M} (groups of a multiple "
                   "of 16), else expanded to float32 in 16 MiB tiles + float32 matmul")


def w8g_dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """The float32 weight ``[N, K]`` of int8 codes ``[N, K]`` and fp16 group scales ``[N, K/G]``:
    ``q * s`` per element, exact in float32 (an 8-bit code times an 11-bit significand)."""
    out_features, groups = scale.shape
    expanded = codes.to(torch.float32).view(out_features, groups, -1) * scale.to(torch.float32).unsqueeze(-1)
    return expanded.view(out_features, -1)


def w8g_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``w8gN`` linear of a float32 ``x [M, K]``: ``y = x @ (q * s)^T + b``. Up to
    :data:`ROWS_KERNEL_MAX_M` rows with a group size that is a multiple of 16: the fused kernel
    (codes read once, scaled in registers); otherwise the weight expanded a tile of output rows
    at a time (no whole float32 copy of it is held). Sums in float32 in either order."""
    out_features, in_features = codes.shape
    if (x.shape[0] <= ROWS_KERNEL_MAX_M and (in_features // scale.shape[1]) % 16 == 0 and native.available()
            and x.is_contiguous()):
        return native.w8g_linear_rows(x, codes, scale, bias)
    rows_per_tile = tile_rows(out_features, in_features)
    if rows_per_tile == out_features:
        return F.linear(x, w8g_dequantize(codes, scale), bias)
    y = torch.empty(x.shape[0], out_features)
    for begin in range(0, out_features, rows_per_tile):
        end = min(out_features, begin + rows_per_tile)
        tile = w8g_dequantize(codes[begin:end], scale[begin:end])
        y[:, begin:end] = F.linear(x, tile, None if bias is None else bias[begin:end])
    return y
