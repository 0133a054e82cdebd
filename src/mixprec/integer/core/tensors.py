"""Tensor descriptions of the integer engine: element types, affine quantization as a
.tflite file stores it, graph inputs, and TFLite's quantized activation range."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mixprec.errors import InputError
from mixprec.integer.core.rounding import round_half_away

ACTIVATIONS = ("none", "relu", "relu6")
#: Element types a graph tensor may have (int16: TFLite's 16x8 activations; int32: token ids).
DTYPES = ("int8", "int16", "float32", "int32")
#: The quantized activation types and their code ranges (int16 is symmetric: zero point 0).
CODE_RANGES = {"int8": (-128, 127), "int16": (-32768, 32767)}


@dataclass(frozen=True)
class Quantization:
    """Affine parameters of one tensor as stored in a .tflite file: float32 ``scale`` and
    integer ``zero_point`` (one each per tensor, or one per channel along ``axis``);
    ``real = scale * (q - zero_point)``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        scales = np.asarray(self.scale, dtype=np.float64)
        if len(self.scale) == 0 or len(self.scale) != len(self.zero_point):
            raise InputError(f"need one zero point per scale, got {len(self.scale)} scales and "
                             f"{len(self.zero_point)} zero points")
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0) or np.any(scales != scales.astype(np.float32)):
            raise InputError(f"scales must be positive finite float32 values, got {self.scale[:4]}")

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int = 0) -> Quantization:
        """One float32 scale (``scale`` is rounded to float32) and one zero point."""
        if not -128 <= int(zero_point) <= 127:
            raise InputError(f"an int8 zero point must lie in [-128, 127], got {zero_point}")
        return cls((float(np.float32(scale)),), (int(zero_point),))

    @property
    def scale32(self) -> NDArray[np.float32]:
        return np.asarray(self.scale, dtype=np.float32)

    def values_of(self, codes: NDArray) -> NDArray[np.float64]:
        """Per-tensor codes as real values ``scale * (q - zero_point)``, exact in float64."""
        self._require_per_tensor()
        return (np.asarray(codes).astype(np.float64) - self.zero_point[0]) * float(self.scale32[0])

    def nearest_codes(self, values: ArrayLike, dtype: str = "int8") -> NDArray:
        """Real ``values`` onto this per-tensor grid in ``dtype`` (int8 or int16):
        ``clamp(round_half_even(x / scale) + zero_point, lo, hi)``, the quotient in float64;
        infinities saturate. (NaN is the caller's to refuse: it has no code.)"""
        self._require_per_tensor()
        if dtype not in CODE_RANGES:
            raise InputError(f"codes are int8 or int16, got {dtype!r}")
        with np.errstate(over="ignore", invalid="ignore"):
            steps = np.round(np.asarray(values, dtype=np.float64) / float(self.scale32[0]))
        return np.clip(steps + self.zero_point[0], *CODE_RANGES[dtype]).astype(dtype)

    def _require_per_tensor(self) -> None:
        if len(self.scale) != 1:
            raise InputError(f"this needs a per-tensor grid, not {len(self.scale)} per-channel scales")


def activation_range(activation: str, output: Quantization, dtype: str = "int8") -> tuple[int, int]:
    """TFLite ``CalculateActivationRangeQuantized`` for an int8 or int16 output (``f / scale`` in
    float32)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; choose {', '.join(ACTIVATIONS)}")
    smallest, largest = CODE_RANGES[dtype]
    scale, zero_point = output.scale32[0], output.zero_point[0]

    def quantize(value: float) -> int:
        return zero_point + int(round_half_away(np.float32(value) / scale))

    if activation == "none":
        return smallest, largest
    low = max(smallest, quantize(0.0))
    return low, largest if activation == "relu" else min(largest, quantize(6.0))


def check_code_grid(dtype: str, quant: Quantization | None, what: str) -> None:
    """Refuse a quantized tensor of ``dtype`` whose grid the type cannot hold: int8 and int16 need
    one (per-tensor) quantization; int16's zero point must be 0 (TFLite's 16x8 mode)."""
    if dtype not in CODE_RANGES:
        return
    if quant is None or len(quant.scale) != 1:
        raise InputError(f"{what}: {dtype} activations need one (per-tensor) quantization")
    low, high = CODE_RANGES[dtype]
    if not low <= quant.zero_point[0] <= high or (dtype == "int16" and quant.zero_point[0] != 0):
        rule = "0 (16x8 activations are symmetric)" if dtype == "int16" else f"in [{low}, {high}]"
        raise InputError(f"{what}: an {dtype} zero point must be {rule}, got {quant.zero_point[0]}")


def require_codes(operation: str, array: object, dtypes: tuple[str, ...] = ("int8", "int16")) -> str:
    """Refuse anything but a numpy array of one of ``dtypes``; return its type's name."""
    if not isinstance(array, np.ndarray) or array.dtype.name not in dtypes:
        raise InputError(f"{operation} takes a numpy array of {' or '.join(dtypes)}, got "
                         f"{getattr(array, 'dtype', type(array).__name__)}")
    return array.dtype.name


def require_array(operation: str, array: object, dtype: type) -> None:
    """Refuse anything but a numpy array of ``dtype``, naming the operation and what came."""
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        name = np.dtype(dtype).name
        article = "an" if name[0] in "aeiou" else "a"
        raise InputError(f"{operation} takes {article} {name} numpy array, got "
                         f"{getattr(array, 'dtype', type(array).__name__)}")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input: name, shape (first dimension the batch), element type, and the
    quantization (required for int8 and int16, zero point 0 for int16; absent for float32 and
    int32)."""

    name: str
    shape: tuple[int, ...]
    quant: Quantization | None
    dtype: str = "int8"

    def __post_init__(self) -> None:
        if len(self.shape) < 1 or any(int(d) < 1 for d in self.shape):
            raise InputError(f"tensor {self.name!r}: shape must have positive sizes, got {self.shape}")
        if self.dtype not in DTYPES:
            raise InputError(f"tensor {self.name!r}: element type {self.dtype!r} is not one of {', '.join(DTYPES)}")
        check_code_grid(self.dtype, self.quant, f"tensor {self.name!r}")
        if self.dtype not in CODE_RANGES and self.quant is not None:
            raise InputError(f"tensor {self.name!r}: {self.dtype} tensors carry no quantization")
