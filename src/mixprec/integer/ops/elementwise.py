"""Int8 and 16x8 elementwise ADD and MUL with TFLite reference semantics (numpy
broadcasting, as TFLite's broadcasting kernels).

ADD (``reference_integer_ops::Add``), with ``left_shift = 20`` (int8) or 15 (int16, the
general-scale 16x8 path TensorFlow's converter selects with ``pot_scale_int16 = false``; the
offsets are then 0)::

    a' = MBQM((a + a_offset) * 2^20, a_multiplier, a_shift)
    b' = MBQM((b + b_offset) * 2^20, b_multiplier, b_shift)
    out = clamp(MBQM(a' + b', out_multiplier, out_shift) + out_offset, act_min, act_max)

MUL (``reference_integer_ops::Mul``)::

    out = clamp(MBQM((a + a_offset) * (b + b_offset), multiplier, shift) + out_offset, act_min, act_max)

``MBQM`` is :func:`mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier` (gemmlowp's
high multiply, then a rounding shift: two roundings, ties away from zero), as in LiteRT's
reference kernels. Every intermediate fits int32: ``|a + a_offset| <=
255`` so ``255 * 2^20 < 2^28`` (int16: ``2^15 * 2^15 = 2^30``), and products of offset values
are at most ``255^2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier
from mixprec.kernels import native

ADD_LEFT_SHIFT = 20
#: ADD's left shift per activation type.
ADD_LEFT_SHIFTS = {"int8": ADD_LEFT_SHIFT, "int16": 15}


def _check_record(opcode: str, dtype: str, *offsets: int) -> None:
    """Refuse a type other than int8 / int16, offsets outside [-255, 255], or (16x8) non-zero ones."""
    if dtype not in ADD_LEFT_SHIFTS:
        raise InputError(f"{opcode} runs on int8 or int16, got {dtype!r}")
    if any(not -255 <= int(offset) <= 255 for offset in offsets):
        raise InputError(f"offsets must lie in [-255, 255], got {offsets}")
    if dtype == "int16" and any(offsets):
        raise InputError(f"16x8 {opcode} takes zero points 0")


def _check_codes(name: str, dtype: type, *arrays: NDArray) -> None:
    for array in arrays:
        if not isinstance(array, np.ndarray) or array.dtype != dtype:
            raise InputError(f"{name} takes {np.dtype(dtype).name} numpy arrays, got "
                             f"{getattr(array, 'dtype', type(array).__name__)}")
    try:
        np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        raise InputError(f"{name}: shapes {[a.shape for a in arrays]} do not broadcast") from None


@dataclass(frozen=True)
class AddParams:
    """Runtime record of an ADD on int8 or int16 (``dtype``): integers only."""

    a_offset: int
    b_offset: int
    a_multiplier: int
    a_shift: int
    b_multiplier: int
    b_shift: int
    output_multiplier: int
    output_shift: int
    output_offset: int
    activation_min: int = -128
    activation_max: int = 127
    dtype: str = "int8"

    def __post_init__(self) -> None:
        _check_record("ADD", self.dtype, self.a_offset, self.b_offset, self.output_offset)
        if max(self.a_shift, self.b_shift, self.output_shift) > 0:
            raise InputError("ADD multipliers must be smaller than one (shifts <= 0)")

    @cached_property
    def int8_table(self) -> torch.Tensor:
        """An int8 ADD's 65,536 codes, entry ``(a + 128) * 256 + b + 128``, computed once by the native kernel,
        then 4 bytes of slack (the lookup kernel's gathers read 4 bytes from an entry)."""
        codes = torch.arange(-128, 128, dtype=torch.int8)
        return torch.cat([_native_add(codes.repeat_interleave(256), codes.repeat(256), self),
                          torch.zeros(4, dtype=torch.int8)])

    @cached_property
    def int8_fit(self) -> torch.Tensor:
        """The lookup kernel's estimate of :attr:`int8_table` (float32 coefficients and margins, checked on every
        pair of codes by the native kernel: see ``csrc/tflite_add.cpp``)."""
        return native.tflite_add_fit(self.int8_table, self.a_offset, self.b_offset, self.a_multiplier, self.a_shift,
                                     self.b_multiplier, self.b_shift, self.output_multiplier, self.output_shift,
                                     self.output_offset, self.activation_min, self.activation_max)


def _native_add(a: torch.Tensor, b: torch.Tensor, params: AddParams) -> torch.Tensor:
    return native.tflite_add(a, b, params.a_offset, params.b_offset, params.a_multiplier, params.a_shift,
                             params.b_multiplier, params.b_shift, params.output_multiplier, params.output_shift,
                             params.output_offset, params.activation_min, params.activation_max)


def add(a: NDArray, b: NDArray, params: AddParams) -> NDArray:
    """``a + b`` of the record's type (see module docstring): for two same-shaped tensors by mixprec's
    native kernel (``csrc/tflite_add.cpp``; int8 from the record's table of every pair's code) when it
    is built, else by :func:`add_reference`."""
    _check_codes("add", np.dtype(params.dtype).type, a, b)
    if a.shape == b.shape and native.available():
        a_codes, b_codes = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
        if params.dtype == "int8":
            return native.tflite_add_lookup(a_codes, b_codes, params.int8_table, params.int8_fit).numpy()
        return _native_add(a_codes, b_codes, params).numpy()
    return add_reference(a, b, params)


def add_reference(a: NDArray, b: NDArray, params: AddParams) -> NDArray:
    """The numpy statement of :func:`add` (any broadcasting shapes), which the native kernel is pinned to."""
    _check_codes("add", np.dtype(params.dtype).type, a, b)
    left_shift = ADD_LEFT_SHIFTS[params.dtype]
    shifted_a = (a.astype(np.int64) + params.a_offset) << left_shift
    shifted_b = (b.astype(np.int64) + params.b_offset) << left_shift
    total = (multiply_by_quantized_multiplier(shifted_a, params.a_multiplier, params.a_shift).astype(np.int64)
             + multiply_by_quantized_multiplier(shifted_b, params.b_multiplier, params.b_shift))
    out = multiply_by_quantized_multiplier(total, params.output_multiplier, params.output_shift).astype(np.int64)
    return np.clip(out + params.output_offset, params.activation_min, params.activation_max).astype(params.dtype)


@dataclass(frozen=True)
class MulParams:
    """Runtime record of a MUL on int8 or int16 (``dtype``; 16x8: zero points 0): integers only."""

    a_offset: int
    b_offset: int
    multiplier: int
    shift: int
    output_offset: int
    activation_min: int = -128
    activation_max: int = 127
    dtype: str = "int8"

    def __post_init__(self) -> None:
        _check_record("MUL", self.dtype, self.a_offset, self.b_offset, self.output_offset)


def mul(a: NDArray, b: NDArray, params: MulParams) -> NDArray:
    """``a * b`` of the record's type (see module docstring; an int16 product fits int32)."""
    _check_codes("mul", np.dtype(params.dtype).type, a, b)
    product = (a.astype(np.int64) + params.a_offset) * (b.astype(np.int64) + params.b_offset)
    out = multiply_by_quantized_multiplier(product, params.multiplier, params.shift).astype(np.int64)
    return np.clip(out + params.output_offset, params.activation_min, params.activation_max).astype(params.dtype)
