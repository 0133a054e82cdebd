"""The shared libraries an ELF shared object names as dependencies (its ``DT_NEEDED`` entries).

Used to check the native build: an extension that carries its own, statically linked copy of the
C++ standard library beside the one PyTorch uses crashes when it builds an error message (seen
with a toolchain whose ``g++`` links ``libstdc++`` statically: ``std::ostream`` on an integer
inside ``TORCH_CHECK`` segfaulted).
"""

from __future__ import annotations

import struct
from pathlib import Path

_ELF_MAGIC = b"\x7fELF"
_SHT_DYNAMIC = 6
_DT_NULL, _DT_NEEDED = 0, 1


def needed_libraries(path: Path) -> list[str]:
    """The ``DT_NEEDED`` names of a 64-bit little-endian ELF file, in order (empty for a file without a
    dynamic section). Raises ``ValueError`` for anything else."""
    data = Path(path).read_bytes()
    if data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    names: list[str] = []
    for _, kind, _, _, offset, size, link, _, _, dyn_entry in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strings_offset = sections[link][4]
        for position in range(offset, offset + size, dyn_entry or 16):
            tag, value = struct.unpack_from("<qQ", data, position)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                start = strings_offset + value
                names.append(data[start:data.index(b"\0", start)].decode())
    return names


def own_cxx_library(path: Path) -> bool:
    """Whether the shared object at ``path`` was linked without ``libstdc++.so`` (so with a static copy
    of the C++ standard library, or none)."""
    return not any(name.startswith("libstdc++.so") for name in needed_libraries(path))
