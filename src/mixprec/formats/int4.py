"""Packing 4-bit codes two per byte.

Layout: along the last axis, element ``2*i`` goes to the low nibble and ``2*i + 1`` to the
high nibble of byte ``i`` (so a row of ``n`` codes takes ``n / 2`` bytes). Signed codes
([-8, 7]) are stored as their two's-complement nibble; unpacking sign-extends them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_int4(q: Tensor, check_range: bool = True) -> Tensor:
    """Pack int8 codes in [-8, 7] or uint8 codes in [0, 15] into a uint8 tensor.

    The last dimension must be even; the result's last dimension is half of it. ``check_range=False``
    skips the range check, for codes in range by construction (nibbles of bytes): the check reads
    the codes' extremes back to the host, which also splits a ``torch.compile`` graph.
    """
    if q.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"pack_int4 takes int8 or uint8 codes, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(
            f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}"
        )
    wide = q.to(torch.int16)
    low, high = (-8, 7) if q.dtype == torch.int8 else (0, 15)
    if check_range and q.numel() and (wide.min() < low or wide.max() > high):
        raise ValueError(f"int4 codes must lie in [{low}, {high}] for {q.dtype} input")
    nibbles = wide & 0x0F
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: Tensor, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in [-8, 7] if ``signed`` else uint8 in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes uint8 bytes, got {packed.dtype}")
    wide = packed.to(torch.int16)
    nibbles = torch.stack((wide & 0x0F, wide >> 4), dim=-1).flatten(-2)
    if signed:
        nibbles = nibbles - ((nibbles & 0x08) << 1)
        return nibbles.to(torch.int8)
    return nibbles.to(torch.uint8)
