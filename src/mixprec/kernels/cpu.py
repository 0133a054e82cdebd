"""What this CPU can run natively, and why a path is slow when it is not."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from mixprec.kernels import native

#: CPU flags (Linux /proc/cpuinfo names) for native fp16 and bf16 matrix arithmetic.
FP16_FLAGS = ("avx512_fp16", "amx_fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    path = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not path.exists():
        return frozenset()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_slow_path() -> str | None:
    """Why layers using the fused C++ kernels run their slower PyTorch path, or None."""
    error = native.load_error()
    return None if error is None else f"native kernels unavailable ({error}); running the PyTorch-op path"


def half_slow_path(fmt: str) -> str | None:
    """Why ``fp16``/``bf16`` GEMMs are emulated (slower than float32) on this CPU, or None."""
    flags = FP16_FLAGS if fmt == "fp16" else BF16_FLAGS
    if cpu_flags() & set(flags):
        return None
    faster = " (bf16 is native here)" if fmt == "fp16" and cpu_flags() & set(BF16_FLAGS) else ""
    return f"this CPU has no {fmt} matrix instructions ({' or '.join(flags)}); {fmt} GEMMs are emulated{faster}"
