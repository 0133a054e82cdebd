"""Property tests of the numeric formats (hypothesis) plus exact spot checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mixprec.formats import (
    SCALE_MIN,
    QuantSpec,
    all_finite,
    count_infinite,
    dequantize,
    fp16_scale,
    pack_int4,
    param_shape,
    qparams_from_range,
    qparams_from_tensor,
    quantize,
    to_half,
    unpack_int4,
)
from mixprec.formats.finite import CHUNK_ELEMENTS
from mixprec.nn import base

SPECS = [
    QuantSpec(bits, signed, symmetric, granularity, 0 if granularity == "channel" else 0,
              8 if granularity == "group" else None)
    for bits in (8, 4)
    for signed in (True, False)
    for symmetric in (True, False)
    for granularity in ("tensor", "channel", "group")
]
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
matrices = arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([8, 16, 24])), elements=finite)


@settings(max_examples=60, deadline=None)
@given(values=matrices, spec=st.sampled_from(SPECS))
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(values: np.ndarray, spec: QuantSpec) -> None:
    x = torch.from_numpy(values)
    qp = qparams_from_tensor(x, spec)
    q = quantize(x, qp)
    assert q.dtype == (torch.int8 if spec.signed else torch.uint8)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    error = (dequantize(q, qp) - x).abs()
    shape = [1] * x.dim()
    if spec.granularity == "channel":
        shape[0] = -1
        bound = qp.scale.reshape(shape)
    elif spec.granularity == "group":
        bound = qp.scale.repeat_interleave(spec.group_size, dim=-1)
    else:
        bound = qp.scale
    # Half a step, plus the float32 rounding of x / scale and of (q - zp) * scale.
    assert bool((error <= bound / 2 * (1 + 1e-5) + x.abs() * 2e-7).all())


@settings(max_examples=40, deadline=None)
@given(values=matrices, spec=st.sampled_from(SPECS), factor=st.floats(1.5, 1e3))
def test_values_outside_the_range_saturate(values: np.ndarray, spec: QuantSpec, factor: float) -> None:
    x = torch.from_numpy(values)
    qp = qparams_from_tensor(x, spec)
    far = torch.full_like(x, float(x.abs().max() + 1) * factor)
    assert bool((quantize(far, qp) == spec.qmax).all())
    assert bool((quantize(-far, qp) == spec.qmin).all())
    assert bool((quantize(torch.full_like(x, float("inf")), qp) == spec.qmax).all())


@settings(max_examples=40, deadline=None)
@given(values=matrices, spec=st.sampled_from(SPECS))
def test_zero_is_exactly_representable(values: np.ndarray, spec: QuantSpec) -> None:
    x = torch.from_numpy(values)
    qp = qparams_from_tensor(x, spec)
    zeros = torch.zeros_like(x)
    assert bool((dequantize(quantize(zeros, qp), qp) == 0).all())


@settings(max_examples=60, deadline=None)
@given(codes=arrays(np.int8, st.tuples(st.integers(1, 5), st.sampled_from([2, 4, 10])), elements=st.integers(-8, 7)))
def test_int4_packing_round_trips_signed(codes: np.ndarray) -> None:
    q = torch.from_numpy(codes)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == q.shape[-1] // 2
    assert torch.equal(unpack_int4(packed, signed=True), q)


@settings(max_examples=40, deadline=None)
@given(codes=arrays(np.uint8, st.tuples(st.integers(1, 5), st.sampled_from([2, 6])), elements=st.integers(0, 15)))
def test_int4_packing_round_trips_unsigned(codes: np.ndarray) -> None:
    q = torch.from_numpy(codes)
    assert torch.equal(unpack_int4(pack_int4(q), signed=False), q)
    assert torch.equal(pack_int4(q, check_range=False), pack_int4(q))  # codes in range: the same bytes unchecked


def test_int4_nibble_order_is_low_first() -> None:
    packed = pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
    assert packed.tolist() == [[0xE1]]


def test_int4_packing_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))


def test_rounding_is_half_to_even() -> None:
    spec = QuantSpec(bits=8, signed=True, symmetric=True)
    qp = qparams_from_range(torch.tensor(-127.0), torch.tensor(127.0), spec)
    assert float(qp.scale) == 1.0
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert quantize(x, qp).tolist() == [0, 2, 2, 0, -2, -2]


def test_asymmetric_parameters_follow_the_documented_formula() -> None:
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert float(qp.scale) == pytest.approx(4.0 / 255.0)
    assert int(qp.zero_point) == round(1.0 / (4.0 / 255.0))  # 64


def test_all_zero_range_gets_the_minimum_scale_and_exact_zero() -> None:
    spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity="channel")
    qp = qparams_from_tensor(torch.zeros(3, 4), spec)
    assert bool((qp.scale == SCALE_MIN).all())
    assert bool((dequantize(quantize(torch.zeros(3, 4), qp), qp) == 0).all())


def test_group_parameters_have_one_scale_per_group() -> None:
    spec = QuantSpec(bits=4, granularity="group", group_size=4)
    assert param_shape((3, 8), spec) == (3, 2)
    with pytest.raises(ValueError, match="does not divide"):
        param_shape((3, 6), spec)


def test_quantize_refuses_nan_and_bad_specs() -> None:
    qp = qparams_from_tensor(torch.ones(4), QuantSpec())
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([1.0, float("nan"), 0.0, 0.0]), qp)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantSpec(bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="group", group_size=3)
    with pytest.raises(ValueError, match="only applies"):
        QuantSpec(granularity="tensor", group_size=4)


@settings(max_examples=60, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 64),
                     elements=st.floats(-1e5, 1e5, allow_nan=False, width=32)))
def test_half_conversion_matches_numpy_round_to_nearest_even(values: np.ndarray) -> None:
    converted = to_half(torch.from_numpy(values), torch.float16)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    assert np.array_equal(converted.tensor.numpy(), expected)
    assert converted.overflow_count == int(np.isinf(expected).sum())


def test_half_conversion_keeps_subnormals_and_counts_overflow() -> None:
    x = torch.tensor([2.0**-24, 2.0**-20, 70000.0, -1e6, float("nan")])
    fp16 = to_half(x, torch.float16)
    assert fp16.tensor[0].item() == 2.0**-24 and fp16.tensor[1].item() == 2.0**-20
    assert fp16.overflow_count == 2 and torch.isnan(fp16.tensor[4])
    bf16 = to_half(torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1e-40]), torch.bfloat16)
    assert bf16.tensor.float().tolist()[:2] == [1.0, 1.0 + 2.0**-6]  # ties to even
    assert bf16.tensor[2].item() != 0.0 and bf16.overflow_count == 0


def test_fp16_scale_keeps_scales_normal_and_refuses_overflow() -> None:
    from mixprec.formats import FP16_SCALE_MIN, fp16_scale

    rounded = fp16_scale(torch.tensor([1e-9, 0.1, 3.0]))
    assert rounded.dtype == torch.float32 and float(rounded[0]) == FP16_SCALE_MIN
    assert float(rounded[1]) == float(torch.tensor(0.1).half()) and float(rounded[2]) == 3.0
    with pytest.raises(ValueError, match="exceeds 65504"):
        fp16_scale(torch.tensor([1e6]))


def test_finiteness_helpers_match_torch() -> None:
    generator = torch.Generator().manual_seed(9)
    for special in (None, float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3000, generator=generator)
        if special is not None:
            x[1234] = special
            x[2999] = special
        assert all_finite(x) == bool(torch.isfinite(x).all())
        assert all_finite(x.bfloat16()) == bool(torch.isfinite(x.bfloat16()).all())
        assert count_infinite(x) == int(torch.isinf(x).sum())
    assert all_finite(torch.empty(0)) and all_finite(torch.tensor([1, 2]))
    big = torch.zeros(CHUNK_ELEMENTS * 2 + 5)
    big[[0, CHUNK_ELEMENTS, -1]] = float("inf")  # one in each chunk
    assert count_infinite(big) == 3


def test_row_chunked_weight_quantization_gives_the_same_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "QUANTIZE_CHUNK_ELEMENTS", 96 * 64)  # 11 chunks, the last one partial
    weight = torch.randn(700, 96, generator=torch.Generator().manual_seed(10))
    for spec in (QuantSpec(granularity="channel", axis=0), QuantSpec(bits=4, granularity="group", group_size=32),
                 QuantSpec()):
        qp = qparams_from_tensor(weight, spec)
        assert torch.equal(base.quantize_rows_in_chunks(weight, qp), quantize(weight, qp))


@pytest.mark.parametrize("cols", [96, 45])  # an odd row length: blocks of an even row count, one pad nibble
def test_row_chunked_int4_packing_gives_the_packed_codes(monkeypatch: pytest.MonkeyPatch, cols: int) -> None:
    monkeypatch.setattr(base, "QUANTIZE_CHUNK_ELEMENTS", 7 * cols)  # blocks of 7 (8 for odd rows), the last partial
    weight = torch.randn(101, cols, generator=torch.Generator().manual_seed(11))
    specs = [QuantSpec(bits=4, granularity="channel", axis=0)]
    specs += [QuantSpec(bits=4, granularity="group", group_size=32)] if cols % 32 == 0 else []
    for spec in specs:
        packed, qp = base.round_weight_int4_packed(weight, spec, scale_fn=fp16_scale)
        codes, expected_qp = base.round_weight(weight, spec, scale_fn=fp16_scale)
        flat = codes.reshape(-1)
        flat = torch.cat((flat, flat.new_zeros(flat.numel() % 2)))
        assert torch.equal(qp.scale, expected_qp.scale)
        assert torch.equal(packed, pack_int4(flat))
        assert torch.equal(unpack_int4(packed, signed=True)[: codes.numel()], flat[: codes.numel()])
    with pytest.raises(ValueError, match="needs a 4-bit spec, got 8 bits"):
        base.round_weight_int4_packed(weight, QuantSpec(granularity="channel", axis=0))


def test_scalar_asymmetric_qparams_equal_the_tensor_ones() -> None:
    from mixprec.formats.affine import asymmetric_scalar_qparams
    from mixprec.nn.linear_int8 import STATIC_ACTIVATION

    rng = np.random.default_rng(0)
    ranges = [(0.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (-1e-30, 1e-30), (-3e38, 3e38), (2.5, 7.0), (-7.0, -2.5)]
    ranges += [tuple(sorted(rng.normal(0, 10, 2) * 10.0 ** rng.integers(-6, 6, 2))) for _ in range(2000)]
    for low, high in ranges:
        low, high = float(np.float32(low)), float(np.float32(high))
        qp = qparams_from_range(torch.tensor(low), torch.tensor(high), STATIC_ACTIVATION)
        assert asymmetric_scalar_qparams(low, high, STATIC_ACTIVATION) == (float(qp.scale), int(qp.zero_point))


def test_scalar_asymmetric_qparams_refuse_what_has_no_grid() -> None:
    from mixprec.formats.affine import asymmetric_scalar_qparams
    from mixprec.nn.linear_int8 import STATIC_ACTIVATION

    with pytest.raises(ValueError, match="finite range low <= high"):
        asymmetric_scalar_qparams(float("nan"), 1.0, STATIC_ACTIVATION)
    with pytest.raises(ValueError, match="finite range low <= high"):
        asymmetric_scalar_qparams(2.0, 1.0, STATIC_ACTIVATION)
