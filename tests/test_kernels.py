"""Fast kernels equal their references exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec.formats import QuantSpec, qparams_from_tensor, quantize
from mixprec.kernels import (
    MAX_REDUCTION,
    cpu,
    int8_matmul,
    int8_matmul_reference,
    native,
    onednn_int8,
    quantize_per_token_symmetric_torch,
    quantize_static_torch,
    rescale_accumulator_torch,
)
from mixprec.kernels.weight_only import (
    ROWS_KERNEL_MAX_M,
    W4_ROWS_KERNEL_MAX_M,
    w4_dequantize_torch,
    w4_linear,
    w4_linear_tiled,
    w8_linear,
    w8_linear_expand,
    w8g_dequantize,
    w8g_linear,
)


@pytest.fixture(autouse=True)
def native_kernels_built() -> None:
    """The fused kernels are what this file tests: a failed build fails every test here."""
    assert native.available(), native.load_error()


def awkward_rows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(40, 301, generator=generator) * torch.logspace(-30, 30, 40).unsqueeze(1)
    x[3] = 0.0
    x[4, :5] = torch.tensor([0.5, 1.5, 2.5, -2.5, 127.0]) / 127.0 * 127.0  # ties on the grid
    x[5] = 1e-40  # subnormal inputs
    return x


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (1, 784, 64), (5, 13, 9), (33, 63, 17), (256, 784, 64), (8, 1000, 130)])
def test_int8_matmul_accumulators_equal_int64_reference(m: int, k: int, n: int) -> None:
    generator = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    a[0] = -128  # extremes: the largest products
    w[0] = -128
    w[-1] = 127
    assert torch.equal(int8_matmul(a, w.t()), int8_matmul_reference(a, w.t()))
    assert int(int8_matmul(a, w.t())[0, 0]) == k * 128 * 128


def test_int8_matmul_refuses_bad_operands() -> None:
    with pytest.raises(ValueError, match="int8 operands"):
        int8_matmul(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[M, K\] @ \[K, N\]"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8))
    too_long = MAX_REDUCTION + 1
    with pytest.raises(ValueError, match="exceeds"):
        int8_matmul(torch.zeros(1, too_long, dtype=torch.int8), torch.zeros(too_long, 1, dtype=torch.int8))


def test_per_token_quantization_equals_the_general_rule_bit_for_bit() -> None:
    x = awkward_rows()
    q, scale = quantize_per_token_symmetric_torch(x)
    qp = qparams_from_tensor(x, QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0))
    assert torch.equal(q, quantize(x, qp))
    assert torch.equal(scale.squeeze(1), qp.scale)


def test_native_kernels_build_here() -> None:
    assert native.load_error() is None, native.load_error()


def test_native_and_torch_quantization_agree_bit_for_bit() -> None:
    x = awkward_rows()
    q_native, s_native = native.quantize_rows_s8(x)
    q_torch, s_torch = quantize_per_token_symmetric_torch(x)
    assert torch.equal(q_native, q_torch) and torch.equal(s_native, s_torch)
    q_unsigned, s_unsigned = native.quantize_rows_u8(x)  # oneDNN's operand: the code + 128
    assert torch.equal(q_unsigned, (q_torch.to(torch.int16) + 128).to(torch.uint8)) and torch.equal(s_unsigned, s_torch)


def test_non_finite_rows_get_a_nan_scale_on_both_paths() -> None:
    x = awkward_rows()[:4].clone()
    x[1, 2] = float("nan")
    x[2, 0] = float("-inf")
    for _, scale in (native.quantize_rows_s8(x), quantize_per_token_symmetric_torch(x)):
        assert torch.isnan(scale[1:3]).all() and torch.isfinite(scale[[0, 3]]).all()


def test_native_and_torch_rescale_agree_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(8)
    acc = torch.randint(-(2**30), 2**30, (33, 17), dtype=torch.int32, generator=generator)
    rows, cols, bias = torch.rand(33, 1) * 1e-3, torch.rand(17) * 1e-2, torch.randn(17)
    for b in (bias, None):
        expected = rescale_accumulator_torch(acc, rows, cols, b)
        assert torch.equal(native.rescale_rows_cols(acc, rows, cols, b), expected)
        float_acc = acc.float()  # what oneDNN returns; rescaled in place, same bits
        in_place = native.rescale_rows_cols_(float_acc, rows, cols, b)
        assert in_place.data_ptr() == float_acc.data_ptr() and torch.equal(in_place, expected)


def test_native_and_torch_static_quantization_agree_bit_for_bit() -> None:
    x = awkward_rows()[:8].clone() * 1e-28
    x[1, 3] = float("nan")
    x[2, :3] = torch.tensor([float("inf"), float("-inf"), 1e30])
    for scale, zero_point in ((0.01, -5), (1e-3, 127), (3.0, -128)):
        q_native, flag_native = native.quantize_rows_static_s8(x, scale, zero_point)
        q_torch, flag_torch = quantize_static_torch(x, scale, zero_point)
        assert torch.equal(q_native, q_torch)
        assert torch.equal(flag_native.isnan(), flag_torch.isnan()) and flag_native.isnan().sum() == 1
        assert int(q_native[2, 0]) == 127 and int(q_native[2, 1]) == -128
        q_tensors, flag_tensors = native.quantize_rows_static_s8_t(  # the scalars as the modules hold them
            x, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32))
        assert torch.equal(q_tensors, q_torch) and torch.equal(flag_tensors.isnan(), flag_torch.isnan())


def test_static_quantization_refuses_scalars_in_the_wrong_tensors() -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="scale as a one-element float32 CPU tensor, got 2 elements"):
        native.quantize_rows_static_s8_t(x, torch.ones(2), torch.zeros((), dtype=torch.int32))
    with pytest.raises(RuntimeError, match="scale as a one-element float32 CPU tensor, got 1 elements of Double"):
        native.quantize_rows_static_s8_t(x, torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.int32))
    with pytest.raises(RuntimeError, match="zero point as a one-element int32 CPU tensor, got 1 elements of Long"):
        native.quantize_rows_static_s8_t(x, torch.ones(()), torch.zeros((), dtype=torch.int64))
    with pytest.raises(RuntimeError, match="contiguous float32 CPU matrix"):
        native.quantize_rows_static_s8_t(x.t(), torch.ones(()), torch.zeros((), dtype=torch.int32))


@pytest.mark.skipif(not onednn_int8.available(), reason="this CPU has no VNNI/AMX int8 kernel in oneDNN")
@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (1, 784, 64), (5, 13, 9), (33, 63, 17), (256, 100, 130), (4, 2000, 8)])
def test_onednn_accumulators_equal_int64_reference(m: int, k: int, n: int) -> None:
    generator = torch.Generator().manual_seed(m + 7 * k + n)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    q[0] = -127
    w[0] = -128
    w[-1] = 127
    packed = onednn_int8.prepack(w)
    assert torch.equal(onednn_int8.unpack(packed), w)
    got = onednn_int8.matmul_u8((q.to(torch.int16) + 128).to(torch.uint8), packed, torch.ones(n),
                                torch.zeros(n, dtype=torch.int32))
    assert torch.equal(got, int8_matmul_reference(q, w.t()).to(torch.float32))


@pytest.mark.skipif(not onednn_int8.available(), reason="this CPU has no VNNI/AMX int8 kernel in oneDNN")
@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (5, 130, 72), (64, 2000, 40)])
def test_onednn_accumulators_with_any_source_zero_point_equal_int64_reference(m: int, k: int, n: int) -> None:
    # int8-asym's packed GEMM: each call's zero point + 128 as oneDNN's source zero point, eager and as the operator
    # torch.compile calls
    generator = torch.Generator().manual_seed(m + 3 * k + n)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    packed, ones, zeros = onednn_int8.prepack(w), torch.ones(n), torch.zeros(n, dtype=torch.int32)
    for zero_point in (0, 1, 127, 128, 200, 255):
        u = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=generator)
        u[0] = 255 if zero_point < 128 else 0  # the largest |u - z| in a whole row
        expected = ((u.to(torch.int64) - zero_point) @ w.t().to(torch.int64)).to(torch.float32)
        assert torch.equal(onednn_int8.matmul_u8_zp(u, packed, ones, zeros, zero_point), expected), zero_point
        assert torch.equal(torch.ops.mixprec.onednn_matmul_u8_zp(u, packed, ones, zeros, torch.tensor(zero_point)),
                           expected)


#: Relative error of the w8 / w8g row kernels' float32 sums (one partial sum per vector lane). Measured: w8
#: 1.8e-7 to 2.1e-7, w8g 1.5e-7 to 2.2e-7 with AVX-512's 16 lanes; w8 2.2e-7 to 2.6e-7, w8g 2.5e-7 to 3.4e-7 with
#: AVX2's 8; without either (one scalar chain per sum) w8 8.0e-7 to 1.25e-6, w8g 9.1e-7 to 9.4e-7.
FLOAT_ROWS_BOUND = 6e-7 if "avx512f" in cpu.cpu_flags() or {"avx2", "fma"} <= cpu.cpu_flags() else 1.6e-6


@pytest.mark.parametrize("rows", [1, 3, 7, 13])  # full blocks of 6 rows and partial ones
def test_w8_rows_kernel_matches_a_float64_reference(rows: int) -> None:
    generator = torch.Generator().manual_seed(11)
    weight = torch.randint(-127, 128, (1101, 1000), dtype=torch.int8, generator=generator)  # a partial block of 4
    scale, bias = torch.rand(1101, generator=generator), torch.randn(1101, generator=generator)
    x = torch.randn(rows, 1000, generator=generator)  # 1000 = 62 x 16 + a tail of 8
    got = native.w8_linear_rows(x, weight, scale, bias).double()
    reference = (x.double() @ weight.double().t()) * scale.double() + bias.double()
    assert float((got - reference).abs().max() / reference.abs().max()) < FLOAT_ROWS_BOUND  # see FLOAT_ROWS_BOUND


def test_w8_rows_kernel_gives_a_row_the_same_bits_in_any_batch() -> None:
    generator = torch.Generator().manual_seed(13)
    weight = torch.randint(-127, 128, (300, 777), dtype=torch.int8, generator=generator)
    scale = torch.rand(300, generator=generator)
    x = torch.randn(ROWS_KERNEL_MAX_M, 777, generator=generator)
    whole = native.w8_linear_rows(x, weight, scale, None)
    for begin, end in ((0, 1), (5, 6), (3, 10), (ROWS_KERNEL_MAX_M - 7, ROWS_KERNEL_MAX_M)):
        assert torch.equal(native.w8_linear_rows(x[begin:end].contiguous(), weight, scale, None), whole[begin:end])


def test_w8_dispatch_by_rows() -> None:
    generator = torch.Generator().manual_seed(12)
    weight = torch.randint(-127, 128, (300, 256), dtype=torch.int8, generator=generator)
    scale = torch.rand(300, generator=generator)
    few = torch.randn(ROWS_KERNEL_MAX_M, 256, generator=generator)
    many = torch.randn(ROWS_KERNEL_MAX_M + 1, 256, generator=generator)
    assert torch.equal(w8_linear(few, weight, scale, None), native.w8_linear_rows(few, weight, scale, None))
    assert torch.equal(w8_linear(many, weight, scale, None), w8_linear_expand(many, weight, scale, None))


@pytest.mark.parametrize(("rows", "group"), [(1, 16), (7, 32), (13, 64)])
def test_w8g_rows_kernel_matches_a_float64_reference_and_is_dispatched(rows: int, group: int) -> None:
    generator = torch.Generator().manual_seed(rows + group)
    codes = torch.randint(-127, 128, (1101, 1024), dtype=torch.int8, generator=generator)
    scale = (torch.rand(1101, 1024 // group, generator=generator) * 0.01 + 1e-3).to(torch.float16)
    bias = torch.randn(1101, generator=generator)
    x = torch.randn(rows, 1024, generator=generator)
    got = native.w8g_linear_rows(x, codes, scale, bias)
    reference = x.double() @ w8g_dequantize(codes, scale).double().t() + bias.double()
    assert float((got.double() - reference).abs().max() / reference.abs().max()) < FLOAT_ROWS_BOUND
    assert torch.equal(w8g_linear(x, codes, scale, bias), got)
    assert torch.equal(native.w8g_linear_rows(x[-1:].contiguous(), codes, scale, bias), got[-1:])  # batch-invariant
    many = torch.randn(ROWS_KERNEL_MAX_M + 1, 1024, generator=generator)
    expanded = nn.functional.linear(many, w8g_dequantize(codes, scale), bias)
    assert torch.equal(w8g_linear(many, codes, scale, bias), expanded)


def test_w8g_kernel_refuses_groups_it_cannot_scale_in_registers() -> None:
    codes = torch.zeros(4, 48, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="G a multiple of 16"):
        native.w8g_linear_rows(torch.zeros(1, 48), codes, torch.ones(4, 6, dtype=torch.float16), None)  # G = 8
    # the dispatcher sends such groups to the expansion path instead
    scale = torch.ones(4, 6, dtype=torch.float16)
    assert torch.equal(w8g_linear(torch.ones(1, 48), codes, scale, None), torch.zeros(1, 4))


def random_w4(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every byte value (so every code -8..7 in both nibbles), fp16 scales, a bias."""
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    packed[0, : min(k // 2, 256)] = torch.arange(min(k // 2, 256), dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=generator) * 0.1).half()
    return packed, scale, torch.randn(n, generator=generator)


# Group sizes 32/64/128 take the vector paths (AVX-512 or AVX2), 16 and 28 the scalar ones; with K a multiple of 128
# and G 32, 64 or a multiple of 128 one row of x takes AVX-512's one-row kernel (linear_one_row).
W4_SHAPES = [(70, 96, 32), (33, 4096, 128), (65, 48, 16), (9, 56, 28), (130, 2048, 64), (40, 512, 32), (24, 768, 256)]


@pytest.mark.parametrize("n,k,group", W4_SHAPES)
def test_w4_native_expansion_equals_torch_expansion_exactly(n: int, k: int, group: int) -> None:
    packed, scale, _ = random_w4(n, k, group, seed=n + k)
    expected = w4_dequantize_torch(packed, scale)
    full = torch.empty(n, k)
    native.w4_dequantize_rows(packed, scale, 0, full)
    assert torch.equal(full, expected)
    tail = torch.empty(n - 5, k)
    native.w4_dequantize_rows(packed, scale, 5, tail)
    assert torch.equal(tail, expected[5:])


@pytest.mark.parametrize("n,k,group", W4_SHAPES)
def test_w4_linear_matches_a_float64_reference(n: int, k: int, group: int) -> None:
    packed, scale, bias = random_w4(n, k, group, seed=n * k)
    weight = w4_dequantize_torch(packed, scale).double()
    generator = torch.Generator().manual_seed(k)
    worst = 0.0
    for m in (1, 3, 4, 5, 8, 13, 16, 17, 40):  # every row block of the fused kernel, and the tiled path
        x = torch.randn(m, k, generator=generator)
        reference = x.double() @ weight.t() + bias.double()
        magnitude = x.double().abs() @ weight.abs().t() + bias.double().abs()
        got = w4_linear(x, packed, scale, bias).double()
        worst = max(worst, float(((got - reference).abs() / magnitude).max()))
    assert worst < 4e-7  # float32 rounding only: measured at most 2.1e-7 of sum |x * w| on these shapes


def test_w4_dispatch_by_rows() -> None:
    packed, scale, bias = random_w4(300, 512, 32, seed=3)
    generator = torch.Generator().manual_seed(4)
    few = torch.randn(W4_ROWS_KERNEL_MAX_M, 512, generator=generator)
    many = torch.randn(W4_ROWS_KERNEL_MAX_M + 1, 512, generator=generator)
    assert torch.equal(w4_linear(few, packed, scale, bias), native.w4_linear_rows(few, packed, scale, bias))
    assert torch.equal(w4_linear(many, packed, scale, bias), w4_linear_tiled(many, packed, scale, bias))


def test_w4_native_ops_refuse_mismatched_operands() -> None:
    packed, scale, _ = random_w4(8, 64, 32, seed=5)
    with pytest.raises(RuntimeError, match="scale must be"):
        native.w4_linear_rows(torch.randn(2, 64), packed, scale.float(), None)
    with pytest.raises(RuntimeError, match="packed must be"):
        native.w4_linear_rows(torch.randn(2, 66), packed, scale, None)
    with pytest.raises(RuntimeError, match="row range"):
        native.w4_dequantize_rows(packed, scale, 4, torch.empty(5, 64))
