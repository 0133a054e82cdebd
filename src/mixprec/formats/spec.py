"""Quantization schemes: how many bits, signedness, symmetry and granularity.

A :class:`QuantSpec` is pure configuration; :mod:`mixprec.formats.affine` turns it and
data into parameters. Integer ranges:

==================  ============  =====================================
bits / signed       symmetric     asymmetric
==================  ============  =====================================
8, signed           [-127, 127]   [-128, 127]
8, unsigned         [1, 255]      [0, 255]
4, signed           [-7, 7]       [-8, 7]
4, unsigned         [1, 15]       [0, 15]
==================  ============  =====================================

Symmetric schemes use the narrow range so that ``-q`` is representable whenever ``q``
is; their zero point is 0 (signed) or ``2**(bits-1)`` (unsigned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Granularity = Literal["tensor", "channel", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantSpec:
    """An affine integer quantization scheme.

    Attributes:
        bits: 8 or 4.
        signed: integers are two's-complement (int8 storage) if True, else unsigned (uint8).
        symmetric: zero point fixed at the middle of the range and the range made
            symmetric around 0; otherwise the range is fitted to [min, max] of the data.
        granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per index
            along ``axis``) or ``"group"`` (one scale per ``group_size`` consecutive
            values along the last axis).
        axis: channel axis for ``"channel"`` granularity.
        group_size: values per group for ``"group"`` granularity.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
                raise ValueError(
                    f"group granularity needs an even group_size >= 2, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} only applies to granularity='group', "
                f"not {self.granularity!r}"
            )

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)
        return 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def symmetric_zero_point(self) -> int:
        """The fixed zero point of a symmetric scheme."""
        return 0 if self.signed else 2 ** (self.bits - 1)
