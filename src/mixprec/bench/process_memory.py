"""Anonymous resident memory of this process (Linux ``/proc``), steady and peak.

Anonymous resident memory (``RssAnon``) counts everything a path really holds, including
what no tensor shows (oneDNN's packed weight copies, allocator slack), and leaves out
file-backed pages (library code mapped in as new kernels run), which would otherwise
read as memory the path holds. For stable figures measure in a fresh child process
started with :func:`child_environment`, whose ``MALLOC_MMAP_THRESHOLD_`` makes glibc hand
every allocation of 64 KiB or more straight back to the kernel on free (otherwise freed
weights may stay resident and read as still held).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")


def supported() -> bool:
    """Whether this platform exposes resident memory the way Linux does."""
    return _STATUS.exists()


def anon_bytes() -> int:
    """Anonymous resident memory now, in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


class PeakSampler:
    """Highest :func:`anon_bytes` seen while the ``with`` block runs, sampled every
    ``interval`` seconds by a background thread (PyTorch kernels release the GIL, so it
    samples during them). Spikes shorter than the interval can be missed."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes())


def child_environment() -> dict[str, str]:
    """The environment for a measuring child process (see the module docstring)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
