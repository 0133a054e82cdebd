"""Half-precision rounding and the int8 <-> half / Qm.n bridges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixprec import InputError
from mixprec.integer import Quantization
from mixprec.integer.half.bridges import QFormat, affine_to_qformat, half_to_int8, int8_to_half, qformat_to_affine
from mixprec.integer.half.formats import bfloat16_to_float32, round_to_format, to_bfloat16, to_float16


def wide_range_values(rng: np.random.Generator, count: int, low: float, high: float) -> np.ndarray:
    return rng.standard_normal(count) * 10.0 ** rng.uniform(low, high, count)


def test_float16_rounding_equals_numpys_conversion_including_subnormals_and_overflow() -> None:
    rng = np.random.default_rng(0)
    edges = [65504.0, 65519.99, 65520.0, -65520.0, 2.0**-25, 3 * 2.0**-26, 2.0**-24, 0.0, -0.0, np.inf, -np.inf]
    x = np.concatenate([wide_range_values(rng, 200_000, -9, 6), edges])
    converted = to_float16(x)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    assert np.array_equal(converted.values.view(np.uint16), expected.view(np.uint16))
    assert converted.overflowed == int((np.abs(x) >= 65520).sum() - np.isinf(x).sum())
    assert to_float16(np.array([2.0**-25, 3 * 2.0**-25])).values.tolist() == [0.0, 2.0**-23]  # ties to even


def test_bfloat16_rounding_equals_torchs_conversion_including_subnormals() -> None:
    rng = np.random.default_rng(1)
    x = wide_range_values(rng, 200_000, -42, 38).astype(np.float32)
    x = np.concatenate([x, np.array([3.3895314e38, 3.4e38, 1e-40, 9.18e-41, -0.0, np.inf], np.float32)])
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    converted = to_bfloat16(x)
    assert np.array_equal(converted.values, expected)
    assert converted.overflowed == 1  # 3.4e38 rounds past the largest bfloat16
    assert np.array_equal(bfloat16_to_float32(converted.values)[:-6],
                          torch.from_numpy(x[:-6]).to(torch.bfloat16).float().numpy())


def test_rounding_keeps_nan_and_refuses_unknown_formats() -> None:
    assert np.isnan(round_to_format([np.nan], "float16")).all()
    with pytest.raises(InputError, match="unknown half format 'fp8'"):
        round_to_format([1.0], "fp8")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_int8_to_half_is_the_nearest_half_value_and_the_bridge_back_is_exact(dtype: str) -> None:
    codes = np.arange(-128, 128, dtype=np.int8)
    for scale, zero_point in ((0.0123, -7), (3.0e-6, 100), (1000.0, 0)):
        quant = Quantization.per_tensor(scale, zero_point)
        half = int8_to_half(codes, quant, dtype)
        real = float(quant.scale32[0]) * (codes.astype(np.float64) - zero_point)
        widened = half.values.astype(np.float64) if dtype == "float16" else bfloat16_to_float32(half.values)
        assert np.array_equal(widened, round_to_format(real, dtype))
        if dtype == "float16":  # 11 significant bits hold every 9-bit code step: the round trip is exact
            if scale * 255 < 65504:
                assert np.array_equal(half_to_int8(half.values, quant), codes)
        else:  # 8 significant bits: the round trip is within one code
            assert np.abs(half_to_int8(half.values, quant).astype(int) - codes).max() <= 1


def test_half_to_int8_rounds_half_to_even_and_saturates() -> None:
    quant = Quantization.per_tensor(0.5, 3)
    x = np.array([0.25, 0.75, -0.25, -0.75, 1000.0, -1000.0, np.inf, -np.inf], np.float16)
    assert half_to_int8(x, quant).tolist() == [3, 5, 3, 1, 127, -128, 127, -128]
    with pytest.raises(InputError, match="2 NaN values reached the half -> int8 bridge"):
        half_to_int8(np.array([np.nan, 1.0, np.nan], np.float16), quant)
    with pytest.raises(InputError, match="float16 values or bfloat16 bit patterns"):
        half_to_int8(np.zeros(3, np.float32), quant)
    with pytest.raises(InputError, match="int8_to_half takes an int8 numpy array"):
        int8_to_half(np.zeros(3, np.int16), quant)


def test_qformat_round_trips_through_affine_grids() -> None:
    codes = np.arange(-128, 128, dtype=np.int8)
    q4_3 = QFormat(4, 3)
    assert q4_3.quantization == Quantization.per_tensor(0.125, 0)
    # Onto a finer affine grid and back: exact. Onto a coarser one: gemmlowp's two roundings
    # (high multiply, then shift), so within 3/4 of a code (5/4 -> 5/2 -> 3 -> 3/2 -> 2).
    fine = Quantization.per_tensor(0.0625, -2)
    on_fine = qformat_to_affine(codes[65:-64], q4_3, fine)
    assert np.array_equal(on_fine.astype(int), codes[65:-64].astype(int) * 2 - 2)
    assert np.array_equal(affine_to_qformat(on_fine, fine, q4_3), codes[65:-64])
    coarse = Quantization.per_tensor(0.5, 0)
    halved = np.floor(codes.astype(float) / 2 + 0.5)  # the high multiply by 1/2: ties toward +inf
    expected = np.sign(halved) * np.floor(np.abs(halved) / 2 + 0.5)  # the shift by 1: ties away from zero
    assert np.array_equal(qformat_to_affine(codes, q4_3, coarse), expected.astype(np.int8))
    assert np.abs(expected - codes / 4).max() == 0.75
    assert np.array_equal(affine_to_qformat(np.array([127, -128], np.int8), coarse, q4_3), [127, -128])
    with pytest.raises(InputError, match="Q5.3 is not an 8-bit signed format"):
        QFormat(5, 3)
