"""gemmlowp/TFLite fixed-point primitives against scalar Python-integer references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixprec import InputError
from mixprec.integer import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_round,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)


def srdhm_reference(a: int, b: int) -> int:
    """gemmlowp's C++ written out with Python integers (C++ '/' truncates toward zero)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    product = a * b
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    numerator = product + nudge
    return int(numerator / 2**31) if abs(numerator) < 2**52 else (abs(numerator) >> 31) * (1 if numerator >= 0 else -1)


def rdbpot_reference(x: int, exponent: int) -> int:
    """Round x / 2^exponent to nearest, ties away from zero, by exact rational arithmetic."""
    from fractions import Fraction

    value = Fraction(x, 2**exponent)
    floor = math.floor(value)
    if value - floor == Fraction(1, 2):
        return floor + 1 if value > 0 else floor
    return round(value)


EXTREMES = [INT32_MIN, INT32_MIN + 1, -(2**30), -3, -1, 0, 1, 3, 2**30, INT32_MAX - 1, INT32_MAX]


def values(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.array(EXTREMES), rng.integers(INT32_MIN, INT32_MAX, count, endpoint=True)])


def test_srdhm_matches_the_reference_bit_for_bit() -> None:
    a, b = np.meshgrid(values(60, 0), values(60, 1))
    got = saturating_rounding_doubling_high_mul(a.ravel(), b.ravel())
    expected = [srdhm_reference(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel())]
    assert got.dtype == np.int32 and got.tolist() == expected
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN) == INT32_MAX


def test_rounding_divide_by_pot_rounds_ties_away_from_zero() -> None:
    xs = values(300, 2)
    for exponent in (0, 1, 2, 5, 17, 31):
        got = rounding_divide_by_pot(xs, exponent)
        assert got.tolist() == [rdbpot_reference(int(x), exponent) for x in xs]
    assert rounding_divide_by_pot([-5, -3, 3, 5], 1).tolist() == [-3, -2, 2, 3]  # -2.5 -> -3, 1.5 -> 2
    with pytest.raises(InputError, match="0 <= exponent <= 31"):
        rounding_divide_by_pot(1, 32)


def test_quantize_multiplier_represents_the_ratio_and_handles_the_edges() -> None:
    rng = np.random.default_rng(3)
    for real in np.concatenate([rng.uniform(1e-6, 1.0, 200), [0.5, 0.25, 1.0, 1.9999999999]]):
        multiplier, shift = quantize_multiplier(float(real))
        assert 2**30 <= multiplier < 2**31
        assert abs(multiplier * 2.0 ** (shift - 31) - real) <= real * 2.0**-31  # half an ulp of 31 bits
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)  # shift < -31: exactly zero, not garbage
    assert multiply_by_quantized_multiplier(INT32_MAX, *quantize_multiplier(2.0**-40)) == 0
    assert quantize_multiplier(1.0 - 2.0**-40) == (2**30, 1)  # rounds up to 2^31 -> halved, shift + 1
    for bad in (-0.5, float("nan"), float("inf"), 2.0**31):
        with pytest.raises(InputError):
            quantize_multiplier(bad)


def test_single_round_multiply_rounds_once_to_nearest_ties_up() -> None:
    from fractions import Fraction

    rng = np.random.default_rng(4)
    x = np.concatenate([rng.integers(-(2**31), 2**31, 3000), [INT32_MIN, INT32_MAX, 0, -1, 1]])
    for real in (0.0003, 0.0421, 0.37, 0.999, 1.5, 3.75):
        multiplier, shift = quantize_multiplier(real)
        got = multiply_by_quantized_multiplier_single_round(x, multiplier, shift)
        factor = Fraction(multiplier, 2 ** (31 - shift))
        expected = [min(max(math.floor(int(v) * factor + Fraction(1, 2)), INT32_MIN), INT32_MAX) for v in x]
        assert got.tolist() == expected  # floor(x * m / 2^t + 1/2): nearest, ties toward +inf, saturated
    assert multiply_by_quantized_multiplier_single_round([-3, 3], 2**30, 0).tolist() == [-1, 2]  # ties up
    for function in (multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_single_round):
        with pytest.raises(InputError, match=r"shift must lie in \[-31, 30\]"):
            function(1, 2**30, 31)
        with pytest.raises(InputError, match="takes int32 x"):
            function(2**31, 2**30, 0)


def test_double_round_multiply_is_the_gemmlowp_composition() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.integers(-(2**20), 2**20, 2000), [0, -1, 1]])
    for real in (0.0003, 0.0421, 0.37, 0.999, 1.5, 3.75):
        multiplier, shift = quantize_multiplier(real)
        got = multiply_by_quantized_multiplier(x, multiplier, shift)
        expected = [rdbpot_reference(srdhm_reference(int(v) << max(shift, 0), multiplier), max(-shift, 0)) for v in x]
        assert got.tolist() == expected
        # Two roundings: within 1/2 + 1/2^(right + 1) of the exact product (measured up to 0.75 at right = 1).
        right = max(-shift, 0)
        exact = x * (multiplier * 2.0 ** (shift - 31))
        assert np.abs(got - exact).max() <= 0.5 + (0.5 / 2**right if right else 0.0) + 1e-9
    assert multiply_by_quantized_multiplier([-3, 3], 2**30, 0).tolist() == [-1, 2]  # the high multiply: ties up
    assert multiply_by_quantized_multiplier([-3, 3], 2**30, -1).tolist() == [-1, 1]  # exact -0.75 and 0.75
    # x * 2^4 = 2^34 leaves int32: saturated to 2^31 - 1 (not wrapped to 0), then times 2^30 / 2^31.
    assert multiply_by_quantized_multiplier(2**30, 2**30, 4) == 2**30


def test_right_shift_rescale_in_one_rounding_equals_the_two_roundings() -> None:
    """Right shifts take one rounding of the 64-bit product: the same integers as the high multiply
    followed by RoundingDivideByPOT, for every exponent 0-31, extreme and random values and multipliers
    (0, 1, 2^30, 2^31 - 1, random), one shift for all or one per element."""
    rng = np.random.default_rng(9)
    x = values(20000, 11)
    for trial in range(24):
        if trial < 4:
            multiplier = np.full(x.size, [0, 1, 2**30, INT32_MAX][trial])
        else:
            multiplier = rng.integers(0, INT32_MAX, x.size, endpoint=True)
        right = rng.integers(0, 32, x.size) if trial % 2 else np.full(x.size, trial % 32)
        expected = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right)
        assert np.array_equal(multiply_by_quantized_multiplier(x, multiplier, -right), expected), trial


def test_gemmlowp_exp_and_reciprocal_approximate_the_real_functions() -> None:
    from mixprec.integer.core.fixedpoint_functions import exp_on_negative_values, one_over_one_plus_x_for_x_in_0_1

    rng = np.random.default_rng(6)
    raw = -rng.integers(0, 31 * 2**26, 200_000)  # Q5.26 values in (-31, 0]
    exp = exp_on_negative_values(raw, 5) / 2**31
    assert np.abs(exp - np.exp(raw / 2**26)).max() < 5e-7  # measured 2.3e-7
    assert exp_on_negative_values(0, 5) == INT32_MAX
    a = rng.integers(0, 2**31 - 1, 200_000)  # Q0.31 values in [0, 1)
    inverse = one_over_one_plus_x_for_x_in_0_1(a) / 2**31
    assert np.abs(inverse - 1 / (1 + a / 2**31)).max() < 7e-9  # measured 3.2e-9
