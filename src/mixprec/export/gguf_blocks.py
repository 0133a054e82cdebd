"""GGML block layouts built from mixprec's codes and scales, byte for byte, no second rounding.

Both block types cover 32 consecutive weights of a row (along the input dimension) and start
with the block's scale ``d`` as a little-endian fp16:

- ``Q8_0``: 2 + 32 bytes per 32 weights (8.5 bits per weight). Bytes 2..33 are the int8
  codes ``q[0..31]``; a weight is ``q * d``. mixprec's ``w8g32`` codes in [-127, 127] with
  their fp16 group scale are these blocks exactly.
- ``Q4_0``: 2 + 16 bytes per 32 weights (4.5 bits per weight). Byte ``2 + j`` holds
  ``u[j]`` in its low nibble and ``u[j + 16]`` in its high nibble (j = 0..15), and a weight
  is ``(u - 8) * d``. mixprec's ``w4g32`` codes ``c`` in [-7, 7] are ``u = c + 8`` with the
  same ``d`` (mixprec never uses ``u = 0``).

In both, ``q * d`` is exact in float32 (at most 8 significant bits times fp16's 11), so a
reader that dequantizes to float32 gets mixprec's dequantized weights bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixprec.formats import unpack_int4

#: Weights per Q8_0 / Q4_0 block.
BLOCK = 32
#: Bytes per block: fp16 scale + codes.
Q8_0_BYTES = 2 + BLOCK
Q4_0_BYTES = 2 + BLOCK // 2


def _scale_bytes(scale: Tensor) -> Tensor:
    """fp16 scales ``[rows, blocks]`` as their little-endian bytes ``[rows, blocks, 2]``."""
    if scale.dtype != torch.float16:
        raise ValueError(f"block scales must be stored as float16, got {scale.dtype}")
    return scale.contiguous().view(torch.uint8).reshape(*scale.shape, 2)


def _check_blocks(rows: int, columns: int, scale: Tensor) -> int:
    if columns % BLOCK:
        raise ValueError(f"rows of {columns} weights do not split into blocks of {BLOCK}")
    blocks = columns // BLOCK
    if tuple(scale.shape) != (rows, blocks):
        raise ValueError(f"expected {(rows, blocks)} block scales, got {tuple(scale.shape)}")
    return blocks


def q8_0_bytes(codes: Tensor, scale: Tensor) -> Tensor:
    """Q8_0 blocks ``[rows, columns / 32 * 34]`` (uint8) of int8 ``codes [rows, columns]`` in
    [-127, 127] with fp16 ``scale [rows, columns / 32]``."""
    if codes.dtype != torch.int8:
        raise ValueError(f"Q8_0 takes int8 codes, got {codes.dtype}")
    rows, columns = codes.shape
    blocks = _check_blocks(rows, columns, scale)
    if codes.numel() and int(codes.min()) < -127:
        raise ValueError("Q8_0 codes of mixprec lie in [-127, 127]; found -128")
    payload = codes.contiguous().view(torch.uint8).reshape(rows, blocks, BLOCK)
    return torch.cat((_scale_bytes(scale), payload), dim=-1).reshape(rows, blocks * Q8_0_BYTES)


def q4_0_bytes(packed: Tensor, scale: Tensor) -> Tensor:
    """Q4_0 blocks ``[rows, columns / 32 * 18]`` (uint8) of mixprec's packed int4 codes
    (``[rows, columns / 2]``, see :mod:`mixprec.formats.int4`, codes in [-7, 7]) with fp16
    ``scale [rows, columns / 32]``."""
    codes = unpack_int4(packed, signed=True)
    rows, columns = codes.shape
    blocks = _check_blocks(rows, columns, scale)
    if codes.numel() and int(codes.min()) < -7:
        raise ValueError("mixprec's int4 weight codes lie in [-7, 7]; found -8, which Q4_0 cannot hold as u - 8")
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(rows, blocks, BLOCK)
    nibbles = unsigned[..., : BLOCK // 2] | (unsigned[..., BLOCK // 2:] << 4)
    return torch.cat((_scale_bytes(scale), nibbles), dim=-1).reshape(rows, blocks * Q4_0_BYTES)


def half_bytes(weight: Tensor) -> Tensor:
    """A float16 or bfloat16 tensor ``[rows, columns]`` as its little-endian bytes ``[rows, 2 * columns]``."""
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"half_bytes takes float16 or bfloat16, got {weight.dtype}")
    return weight.contiguous().view(torch.uint8).reshape(weight.shape[0], -1)
