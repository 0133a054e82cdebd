"""The few-row kernel of dense int8 weights (csrc/int8_dense_rows.cpp: AVX512-VNNI, or AVX2's int16 pair sums):
the bits of the torch._int_mm path, whatever oneDNN can do on this CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec.formats import qparams_from_tensor
from mixprec.kernels import int8_linear, native
from mixprec.kernels.activation_quant import quantize_static_torch, rescale_accumulator_torch
from mixprec.nn import Int8StaticLinear
from mixprec.nn.linear_int8 import STATIC_ACTIVATION

pytestmark = pytest.mark.skipif(not native.int8_dense_rows_available(),
                                reason="no AVX512-VNNI or AVX2 kernel in this build")

@pytest.mark.parametrize(("out_features", "in_features"), [(1, 1), (17, 5), (40, 200), (33, 130), (512, 576)])
def test_few_rows_of_a_dense_int8_weight_stream_it_with_the_int_mm_bits(out_features: int, in_features: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Up to 4 rows and weights of DENSE_ROWS_MIN_WEIGHTS elements or more run csrc/int8_dense_rows.cpp; the
    # fused torch._int_mm call is the reference (exact int32 sums, the same float32 epilogue).
    monkeypatch.setattr(int8_linear, "DENSE_ROWS_MIN_WEIGHTS", 1)
    generator = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    weight[0] = -127  # the largest weight sum, whose 128 * sum the kernel takes back out
    scale, bias = torch.rand(out_features, generator=generator) * 0.01, torch.randn(out_features, generator=generator)
    for rows in (1, 2, 3, 4, 9):  # 9: chunks of 4, 4 and 1 where oneDNN has no VNNI int8 GEMM
        x = torch.randn(rows, in_features, generator=generator) * 3
        x[-1, 0] = 1e4  # a row of zero codes but one
        if rows == 3:
            x[1, -1] = float("nan")
        for b in (bias, None):
            expected = native.int8_linear_dynamic(x, weight, scale, b)
            got = int8_linear.int8_linear_dynamic(x, weight, scale, b)
            assert torch.equal(got.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32)), rows
            assert torch.equal(got.isnan(), expected.isnan())


@pytest.mark.parametrize(("out_features", "in_features"), [(17, 5), (33, 130), (512, 576)])
def test_few_rows_of_an_int8_static_linear_stream_the_weight_with_the_int_mm_bits(
        out_features: int, in_features: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # int8-static feeds its calibrated codes + 128 to csrc/int8_dense_rows.cpp (the zero point's term is in the
    # bias); torch._int_mm on the signed codes and the same rescale is the reference.
    monkeypatch.setattr(int8_linear, "DENSE_ROWS_MIN_WEIGHTS", 1)
    generator = torch.Generator().manual_seed(out_features + in_features)
    layer = nn.Linear(in_features, out_features)
    module = Int8StaticLinear.from_float(
        layer, qparams_from_tensor(torch.randn(64, in_features, generator=generator) * 2, STATIC_ACTIVATION))
    assert "streaming the weight once" in module.kernel
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(rows, in_features, generator=generator) * 3
        x[-1, 0] = float("inf")  # saturates
        if rows == 3:
            x[1, -1] = float("nan")
        q, flag = quantize_static_torch(x, module.input_scale, module.input_zero_point)
        exact = q.to(torch.int64) @ module.weight.t().to(torch.int64)
        expected = rescale_accumulator_torch(exact, flag, module.input_scale * module.weight_scale, module.bias)
        with torch.no_grad():
            got = module(x)
        assert torch.equal(got.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32)), rows
        assert torch.equal(got.isnan(), expected.isnan())


def test_the_dense_rows_kernel_refuses_bad_operands() -> None:
    q, weight, ones = torch.full((1, 64), 128, dtype=torch.uint8), torch.ones(32, 64, dtype=torch.int8), torch.ones(32)
    assert torch.equal(native.int8_dense_rows(q, torch.ones(1), weight, ones, None), torch.zeros(1, 32))
    with pytest.raises(RuntimeError, match="rows, got 0"):
        native.int8_dense_rows(q[:0], torch.ones(0), weight, ones, None)
    with pytest.raises(RuntimeError, match="contiguous int8 CPU weight"):
        native.int8_dense_rows(q, torch.ones(1), weight[:, :63], ones, None)
    with pytest.raises(RuntimeError, match="col_scale must be float32 with one value per output channel"):
        native.int8_dense_rows(q, torch.ones(1), weight, torch.ones(31), None)
    with pytest.raises(RuntimeError, match="uint8 CPU codes"):
        native.int8_dense_rows(q.to(torch.int8), torch.ones(1), weight, ones, None)


def test_the_extreme_codes_sum_exactly() -> None:
    # -128 codes against -128 weights: each product 2**14, a pair 2**15, past int16 (where AVX2's u8 x s8 pair
    # sums saturate); K = 4099 also leaves a tail after the vector steps; 11 rows run as chunks of 4, 4 and 3.
    # Exact int64 sums are the reference.
    q = torch.zeros(11, 4099, dtype=torch.uint8)  # codes -128 (+ 128)
    q[1], q[2, ::2], q[3] = 255, 255, torch.arange(4099) % 256  # 127; mixed; every code
    q[4:] = torch.randint(0, 256, (7, 4099), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    weight = torch.full((19, 4099), -128, dtype=torch.int8)
    weight[1::2, 1::3] = 127
    exact = (q.to(torch.int64) - 128) @ weight.t().to(torch.int64)
    ones, halves = torch.ones(19), torch.full((11,), 0.5)
    assert torch.equal(native.int8_dense_rows(q, halves, weight, ones, None), (exact.double() * 0.5).float())
