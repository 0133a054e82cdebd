"""w4a8: int4 weights in groups times dynamic int8 activations (the VNNI kernel and its fallback)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec
from mixprec import Policy, PolicyError
from mixprec.errors import InputError
from mixprec.formats import pack_int4, unpack_int4
from mixprec.kernels import native, quantize_per_token_symmetric_torch
from mixprec.kernels import w4a8_linear as w4a8
from mixprec.nn import W4A8Linear, W4Linear

needs_vnni = pytest.mark.skipif(not native.w4a8_available(), reason="the native build has no AVX512-VNNI kernel")

# (M, K, N, G): M = 1 and M not a multiple of the 6-row block, N not a multiple of the
# 32-channel block, K % 8 == 4 (a last single quad), group sizes 4 to 128; M <= 4 with K a
# multiple of 32 and G of 32 take the few-row path (N not a multiple of its 16-row block, groups
# of 32 to 256, one group spanning two 128-code chunks, a last chunk of 32 or 64 codes, K < 128).
SHAPES = [(1, 4, 1, 4), (3, 12, 33, 4), (13, 1028, 47, 4), (7, 64, 64, 32), (17, 4096, 100, 128), (40, 96, 70, 32),
          (6, 112, 31, 28), (2, 256, 96, 64), (1, 512, 37, 32), (4, 1024, 48, 256), (3, 384, 17, 128),
          (1, 576, 35, 32), (2, 96, 20, 32), (4, 1056, 18, 96)]


def random_codes(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes over the whole int8 range (-128 included) and every int4 code, with the
    extremes of both in the first row and channel."""
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
    xq[0, : k // 2] = -128
    xq[0, k // 2:] = 127
    codes[0, : k // 2] = -8
    codes[0, k // 2:] = 7
    return xq, codes


def group_dots(xq: torch.Tensor, codes: torch.Tensor, group: int) -> torch.Tensor:
    """Exact integer dot products per group, int64 ``[M, N, K / G]``."""
    m, k = xq.shape
    n = codes.shape[0]
    return (xq.long().view(m, 1, k // group, group) * codes.long().view(1, n, k // group, group)).sum(-1)


@needs_vnni
@pytest.mark.parametrize("m,k,n,group", SHAPES)
def test_integer_sums_equal_an_int64_reference_exactly(m: int, k: int, n: int, group: int) -> None:
    # Unit scales: the output is the float32 sum of the exact group dot products, which is
    # exact while every partial sum stays below 2**24 (here at most 1024 * K <= 2**22).
    xq, codes = random_codes(m, k, n, seed=m * k + n)
    unit = torch.ones(n, k // group, dtype=torch.float16)
    y = native.w4a8_linear(xq, torch.ones(m, 1), pack_int4(codes), unit, None)
    expected = xq.long() @ codes.long().t()
    assert torch.equal(y.double(), expected.double())


@needs_vnni
@pytest.mark.parametrize("m,k,n,group", SHAPES)
def test_scaled_output_matches_a_float64_reference(m: int, k: int, n: int, group: int) -> None:
    xq, codes = random_codes(m, k, n, seed=m + k * n)
    generator = torch.Generator().manual_seed(k)
    scale = (torch.rand(n, k // group, generator=generator) * 0.1 + 1e-3).half()
    x_scale = torch.rand(m, 1, generator=generator) * 0.02
    bias = torch.randn(n, generator=generator)
    y = native.w4a8_linear(xq, x_scale, pack_int4(codes), scale, bias).double()
    terms = group_dots(xq, codes, group).double() * scale.double().unsqueeze(0)
    reference = terms.sum(-1) * x_scale.double() + bias.double()
    magnitude = terms.abs().sum(-1) * x_scale.double() + bias.double().abs()
    # float32 group sums, one rounding per group and one for the epilogue: measured at most
    # 2.14e-7 of sum |terms| over these shapes.
    assert float(((y - reference).abs() / magnitude).max()) < 4.2e-7


@needs_vnni
def test_each_row_gives_the_same_bits_in_any_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(23, 256, generator=generator)
    packed = torch.randint(0, 256, (70, 128), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(70, 8, generator=generator) * 0.1).half()
    batch = w4a8.w4a8_linear(x, packed, scale, None)
    for row in (0, 5, 6, 22):
        assert torch.equal(w4a8.w4a8_linear(x[row:row + 1], packed, scale, None), batch[row:row + 1])
    assert torch.equal(w4a8.w4a8_linear(x[7:19], packed, scale, None), batch[7:19])


@needs_vnni
@pytest.mark.parametrize("k,group", [(768, 32), (768, 64), (768, 128), (768, 256), (704, 32), (704, 64), (96, 32)])
def test_few_row_path_gives_the_many_row_paths_bits(k: int, group: int) -> None:
    # Up to 4 rows read the packed codes in place (lanes along k), more rows unpack blocks of
    # channels (lanes along channels): the same integer group sums and float32 steps.
    generator = torch.Generator().manual_seed(group + k)
    x = torch.randn(12, k, generator=generator) * torch.logspace(-2, 2, k)
    packed = torch.randint(0, 256, (83, k // 2), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(83, k // group, generator=generator) * 0.1).half()
    bias = torch.randn(83, generator=generator)
    batch = w4a8.w4a8_linear(x, packed, scale, bias)
    for begin, end in ((0, 1), (3, 5), (5, 8), (8, 12)):
        assert torch.equal(w4a8.w4a8_linear(x[begin:end], packed, scale, bias), batch[begin:end])


def test_fallback_uses_the_same_codes_and_differs_by_rounding_only(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(9, 192, generator=generator)
    packed = torch.randint(0, 256, (40, 96), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(40, 6, generator=generator) * 0.1).half()
    bias = torch.randn(40, generator=generator)
    fast = w4a8.w4a8_linear(x, packed, scale, bias)
    xq, x_scale = quantize_per_token_symmetric_torch(x)
    codes = unpack_int4(packed, signed=True)
    terms = group_dots(xq, codes, 32).double() * scale.double().unsqueeze(0)
    reference = terms.sum(-1) * x_scale.double() + bias.double()
    magnitude = terms.abs().sum(-1) * x_scale.double() + bias.double().abs()
    monkeypatch.setattr(native, "w4a8_available", lambda: False)
    slow = w4a8.w4a8_linear(x, packed, scale, bias)
    # Measured: native 8.7e-8 of sum |terms| (float32 sums of exact group dot products),
    # the fallback's float32 matmul over K 2.67e-7.
    for y, bound in ((fast, 1.7e-7), (slow, 5.3e-7)):
        assert float(((y.double() - reference).abs() / magnitude).max()) < bound


def test_non_finite_rows_become_nan_rows() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=generator)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    packed = torch.randint(0, 256, (33, 32), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(33, 2, generator=generator) * 0.1).half()
    y = w4a8.w4a8_linear(x, packed, scale, None)
    assert bool(y[[1, 2]].isnan().all()) and bool(y[[0, 3]].isfinite().all())


@needs_vnni
def test_native_op_refuses_mismatched_operands() -> None:
    xq = torch.zeros(2, 64, dtype=torch.int8)
    packed = torch.zeros(8, 32, dtype=torch.uint8)
    scale = torch.ones(8, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="xq must be a contiguous int8"):
        native.w4a8_linear(xq.float(), torch.ones(2, 1), packed, scale, None)
    with pytest.raises(RuntimeError, match="x_scale must hold one float32 per row"):
        native.w4a8_linear(xq, torch.ones(3, 1), packed, scale, None)
    with pytest.raises(RuntimeError, match="group size G divisible by 4"):
        native.w4a8_linear(xq, torch.ones(2, 1), packed, torch.ones(8, 32, dtype=torch.float16), None)
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        native.w4a8_linear(xq, torch.ones(2, 1), packed, scale, torch.zeros(7))


def test_module_shares_w4_storage_and_only_quantizes_activations_on_top() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    module, weight_only = W4A8Linear.from_float(layer, 32), W4Linear.from_float(layer, 32)
    assert torch.equal(module.weight_packed, weight_only.weight_packed) and module.precision == "w4a8g32"
    assert module.storage_bytes() == weight_only.storage_bytes() == 40 * 48 + 2 * 40 * 3 + 4 * 40
    x = torch.randn(5, 96)
    xq, x_scale = quantize_per_token_symmetric_torch(x)
    expected = weight_only(xq.float() * x_scale)  # w4 applied to the dequantized int8 activations
    # float32 rounding only: measured 7.3e-8 of the largest output
    assert torch.allclose(module(x), expected, rtol=0, atol=1.4e-7 * float(expected.abs().max()))
    assert module(torch.randn(2, 3, 96)).shape == (2, 3, 40)
    with pytest.raises(InputError, match=r"\[\.\.\., 96\]"):
        module(torch.randn(2, 95))
    with pytest.raises(ValueError, match="group size divisible by 4"):
        W4A8Linear(96, 40, True, group_size=6)


def test_policy_names_and_refusals() -> None:
    net = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))
    emb = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(PolicyError, match=r"'w4a8g6': w4a8 multiplies 4 codes at a time.*e\.g\. w4a8g8"):
        Policy(default="w4a8g6")
    with pytest.raises(PolicyError, match=r"'w4a8' is not valid for layer '0' \(Embedding\)"):
        Policy(default="w4a8").plan(emb)
    with pytest.raises(PolicyError, match="group size 128 does not divide the 96 input features"):
        Policy(default="w4a8g128").plan(net)
    report = mixprec.quantize(net, Policy([("0", "w4a8g16")], default="w4a8"))
    assert [report.layer(name).precision for name in ("0", "2")] == ["w4a8g16", "w4a8"]
    assert [net[i].precision for i in (0, 2)] == ["w4a8g16", "w4a8g32"]


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    build = lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))  # noqa: E731
    model = build()
    mixprec.quantize(model, "w4a8")
    mixprec.save(model, tmp_path / "m.safetensors")
    fresh = build()
    mixprec.load(fresh, tmp_path / "m.safetensors")
    x = torch.randn(7, 64)
    assert isinstance(fresh[0], W4A8Linear) and torch.equal(fresh(x), model(x))
