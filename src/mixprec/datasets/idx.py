"""Reader for IDX files (the MNIST family's format), gzip-compressed or raw.

Layout: 2 zero bytes, a type byte (0x08 = unsigned byte, the only type read here), a
byte with the number of dimensions, then each dimension as a big-endian uint32, then
the values in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from mixprec.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


def read_idx_bytes(path: str | os.PathLike[str]) -> bytes:
    """The decompressed bytes of an IDX file (gzip detected by its magic number)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {str(path)!r} does not exist") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{str(path)!r} is a damaged or truncated gzip file: {exc}") from None
    return raw


def parse_idx(data: bytes, name: str, ndim: int) -> np.ndarray:
    """Parse IDX bytes of unsigned-byte type with ``ndim`` dimensions into a uint8 array."""
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    expected_magic = (_UBYTE << 8) | ndim
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        raise DataError(
            f"{name}: magic number 0x{int.from_bytes(data[:4], 'big'):08x}, expected "
            f"0x{expected_magic:08x} (unsigned bytes, {ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated header ({len(data)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise DataError(
            f"{name}: header says {'x'.join(map(str, shape))} = {count} values but the file holds "
            f"{len(data) - header}; the file is truncated or padded"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions."""
    return parse_idx(read_idx_bytes(path), Path(path).name, ndim)
