"""Int4 weights in groups times dynamic int8 activations (``w4a8gN``).

``y[m, n] = sx[m] * sum_g s[n, g] * D[m, n, g] + b[n]``: ``x`` is quantized per row to
int8 codes in [-127, 127] with scale ``sx`` (exactly as the ``int8`` linears do), ``D`` is
the exact integer dot product of a row's codes with the int4 codes ``q`` of group ``g``,
and ``s`` are the fp16 group scales. Native path: one AVX512-VNNI kernel
(``csrc/w4a8_gemm.cpp``; group sums in float32, one rounding each, in increasing ``g``;
then ``fma(sum, sx, b)``) on either of two layouts of the same codes: the packed ``[N, K/2]``
bytes every int4 format here uses (:func:`w4a8_linear`; blocks of 32 channels unpacked per
call), or the blocked layout ``W4A8Linear`` holds when G is a multiple of 8
(:func:`to_blocked`, :func:`w4a8_linear_blocked`): 32 channels x 8 codes per 128 bytes, one
contiguous stream per 32 channels read in place at every M (4096 x 4096 at M = 1 with the
weight streamed from DRAM: 0.34-0.39 ms, against 0.53-0.63 ms for the packed codes read in
place by the kernel it replaced and 0.29-0.32 ms for a plain sum of the same bytes). Both
layouts give the same bits. Each row's output depends on that row alone, so a row gives the
same bits in any batch. Without AVX512-VNNI the blocked layout runs an AVX2 form of the same
kernel (vpmaddubsw pairs, exact in int16; the same bits). Fallback (no native build, or neither
instruction set; the packed layout without VNNI): the weight expanded
to float32 (``q * s`` is exact) times the float32 codes in one matmul, rescaled per row;
it differs from the native path by float32 rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixprec.formats import pack_int4, unpack_int4
from mixprec.kernels import native
from mixprec.kernels.activation_quant import quantize_per_token_symmetric_torch
from mixprec.kernels.weight_only import w4_dequantize_torch

KERNEL_NAME = "int4 weights x dynamic int8 activations: AVX512-VNNI C++ GEMM, int32 per group, float32 group sums"
AVX2_KERNEL_NAME = ("int4 weights x dynamic int8 activations: AVX2 C++ GEMM (int16 pair sums), int32 per group, "
                    "float32 group sums")
FALLBACK_KERNEL_NAME = "int4 weights expanded to float32 x int8 activation codes, float32 matmul (PyTorch ops)"


def native_path() -> bool:
    """Whether :func:`w4a8_linear` runs the VNNI kernel here."""
    return native.w4a8_available()


def blocked_native_path() -> bool:
    """Whether :func:`w4a8_linear_blocked` runs a native kernel here (VNNI, or AVX2 without it)."""
    return native.w4a8_blocked_available()


def kernel_name(blocked: bool) -> str:
    """What a ``w4a8`` layer of either layout runs here."""
    if blocked and blocked_native_path() and not native_path():
        return AVX2_KERNEL_NAME
    return KERNEL_NAME if native_path() else FALLBACK_KERNEL_NAME


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


#: Output channels per block of the blocked layout (zero-padded up to a multiple of it).
BLOCK_CHANNELS = 32
#: Codes per 4-byte lane of the blocked layout; group sizes must be multiples of it.
BLOCK_CODES = 8
#: Channels converted at once between the layouts (bounds the temporaries: 2 bytes per code).
_CONVERT_CHANNELS = 1024


def blocked_layout_applies(group_size: int) -> bool:
    """Whether ``w4a8gN`` with this group size holds the blocked layout (groups of whole 8-code lanes)."""
    return group_size % BLOCK_CODES == 0


def blocked_shapes(out_features: int, in_features: int, group_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the blocked codes ``[N'/32, K/8, 32, 4]`` and scales ``[N'/32, K/G, 32]`` (N' = N rounded up to 32)."""
    blocks = -(-out_features // BLOCK_CHANNELS)
    return ((blocks, in_features // BLOCK_CODES, BLOCK_CHANNELS, 4),
            (blocks, in_features // group_size, BLOCK_CHANNELS))


def to_blocked(packed: Tensor, scale: Tensor, codes_out: Tensor, scale_out: Tensor) -> None:
    """Writes packed ``[N, K/2]`` codes and ``[N, K/G]`` fp16 scales into the blocked layout
    (``codes_out``, ``scale_out`` of :func:`blocked_shapes`; channels past N get code 0 and scale 0):
    lane byte ``j`` of channel ``n``, octet ``o`` = code ``8o + j`` (low nibble) | code ``8o + 4 + j`` (high)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or scale.dim() != 2 or scale.shape[0] != packed.shape[0]:
        raise ValueError(f"to_blocked takes packed uint8 codes [N, K/2] and scales [N, K/G], got {packed.dtype} "
                         f"{tuple(packed.shape)} and {tuple(scale.shape)}")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    group = cols // scale.shape[1] if scale.shape[1] else 0
    expected = blocked_shapes(rows, cols, group) if group and cols % group == 0 else None
    if not (expected and blocked_layout_applies(group) and tuple(codes_out.shape) == expected[0]
            and tuple(scale_out.shape) == expected[1]):
        raise ValueError(f"to_blocked needs a group size that divides K = {cols} and is a multiple of {BLOCK_CODES}, "
                         f"and outputs of blocked_shapes(N, K, G); got scales {tuple(scale.shape)}, outputs "
                         f"{tuple(codes_out.shape)} and {tuple(scale_out.shape)}")
    for begin in range(0, rows, _CONVERT_CHANNELS):  # a multiple of 32: whole blocks
        end = min(begin + _CONVERT_CHANNELS, rows)
        nibbles = unpack_int4(packed[begin:end], signed=False).view(end - begin, cols // BLOCK_CODES, 2, 4)
        lanes = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)  # [channels, K/8, 4]
        first, last = begin // BLOCK_CHANNELS, -(-end // BLOCK_CHANNELS)
        target = lanes.new_zeros(((last - first) * BLOCK_CHANNELS, cols // BLOCK_CODES, 4))
        target[: end - begin] = lanes
        codes_out[first:last] = target.view(last - first, BLOCK_CHANNELS, cols // BLOCK_CODES, 4).transpose(1, 2)
    padded = scale.new_zeros(scale_out.shape[0] * BLOCK_CHANNELS, scale.shape[1])
    padded[:rows] = scale
    scale_out.copy_(padded.view(scale_out.shape[0], BLOCK_CHANNELS, -1).transpose(1, 2))


def codes_from_blocked(codes: Tensor, out_features: int) -> Tensor:
    """The packed ``[N, K/2]`` codes a blocked layout holds (:func:`to_blocked`'s inverse for the codes)."""
    blocks, octets = codes.shape[0], codes.shape[1]
    if codes.is_meta:  # a model being built on the meta device: shapes only
        return codes.new_empty((out_features, octets * BLOCK_CODES // 2))
    lanes = codes.transpose(1, 2).reshape(blocks * BLOCK_CHANNELS, octets, 4)[:out_features]
    nibbles = torch.stack((lanes & 0x0F, lanes >> 4), dim=2).reshape(out_features, octets * BLOCK_CODES)
    return pack_int4(nibbles, check_range=False)  # nibbles: in [0, 15] by construction


def scale_from_blocked(scale: Tensor, out_features: int) -> Tensor:
    """The ``[N, K/G]`` fp16 scales a blocked layout holds."""
    return scale.transpose(1, 2).reshape(-1, scale.shape[1])[:out_features].contiguous()


def from_blocked(codes: Tensor, scale: Tensor, out_features: int) -> tuple[Tensor, Tensor]:
    """The packed ``[N, K/2]`` codes and ``[N, K/G]`` fp16 scales a blocked layout holds
    (:func:`to_blocked`'s inverse)."""
    return codes_from_blocked(codes, out_features), scale_from_blocked(scale, out_features)


def w4a8_linear_blocked(x: Tensor, codes: Tensor, scale: Tensor, out_features: int, bias: Tensor | None) -> Tensor:
    """:func:`w4a8_linear` on the blocked layout (:func:`to_blocked`); the same bits. Without VNNI, AVX2 runs
    the same integer sums and float32 steps natively (``csrc/w4a8_gemm.cpp``)."""
    if blocked_native_path() and x.is_contiguous():
        xq, row_scale = native.quantize_rows_s8(x)
        return native.w4a8_linear_blocked(xq, row_scale, codes, scale, out_features, bias)
    packed, dense_scale = from_blocked(codes, scale, out_features)
    return w4a8_linear_torch(x, packed, dense_scale, bias)
