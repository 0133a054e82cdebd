"""Quantized modules: exact arithmetic against references, exact bytes, clear input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec import InputError
from mixprec.formats import QuantSpec, dequantize, qparams_from_tensor, quantize, unpack_int4
from mixprec.kernels import native
from mixprec.kernels.activation_quant import (
    ACTIVATION_PER_TENSOR,
    dynamic_tensor_qparams,
    dynamic_tensor_qparams_torch,
)
from mixprec.nn import (
    HalfEmbedding,
    HalfLinear,
    Int8AsymLinear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8StaticLinear,
    W4Embedding,
    W4Linear,
    W8Linear,
)


def linear(k: int = 96, n: int = 40, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def test_int8_dynamic_linear_matches_integer_reference_exactly() -> None:
    layer = linear()
    module = Int8DynamicLinear.from_float(layer)
    x = torch.randn(7, 96)
    x_qp = qparams_from_tensor(x, QuantSpec(granularity="channel", axis=0))
    acc = quantize(x, x_qp).long() @ module.weight.long().t()
    expected = acc.float() * x_qp.scale.unsqueeze(1) * module.weight_scale + layer.bias.detach()
    assert torch.equal(module(x), expected)


def test_int8_dynamic_linear_without_native_kernels_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    module = Int8DynamicLinear.from_float(linear())
    x = torch.randn(9, 96)
    fused = module(x)
    assert "one fused C++ call" in module.kernel
    monkeypatch.setattr(native, "available", lambda: False)
    assert "PyTorch ops" in module.kernel
    assert torch.equal(module(x), fused)


def test_int8_dynamic_linear_is_close_to_float() -> None:
    layer = linear()
    x = torch.randn(64, 96)
    ref = layer(x).detach()
    err = (Int8DynamicLinear.from_float(layer)(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.018  # measured 0.0089 (seed 0)


def test_int8_linear_turns_non_finite_tokens_into_nan_rows() -> None:
    module = Int8DynamicLinear.from_float(linear())
    x = torch.randn(3, 96)
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    y = module(x)
    assert bool(torch.isfinite(y[0]).all())
    assert bool(torch.isnan(y[1:]).all())


def _asym_reference(module: Int8AsymLinear, x: torch.Tensor) -> torch.Tensor:
    """int8-asym from mixprec.formats and an int64 GEMM: the documented arithmetic, step by step."""
    x_qp = qparams_from_tensor(x, ACTIVATION_PER_TENSOR)
    acc = (quantize(x, x_qp).long() - int(x_qp.zero_point)) @ module.weight.long().t()
    return acc.float() * (x_qp.scale * module.weight_scale) + module.bias


@pytest.mark.parametrize("shift", [0.0, 2.5, -2.5])  # zero point mid-range, at -128 (x >= 0), at 127 (x <= 0)
def test_int8_asym_linear_matches_integer_reference_and_its_fallback(shift: float,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    module = Int8AsymLinear.from_float(linear())
    x = torch.randn(9, 96) + shift
    if shift:
        x = x.clamp(min=0) if shift > 0 else x.clamp(max=0)
    y = module(x)
    assert torch.equal(y, _asym_reference(module, x))
    assert "fused C++" in module.kernel
    monkeypatch.setattr(native, "available", lambda: False)
    assert "PyTorch-op" in module.kernel
    assert torch.equal(module(x), y)


def test_int8_asym_qparams_are_the_formats_grid_in_both_paths() -> None:
    torch.manual_seed(0)
    for x in (torch.randn(50, 8) * 3 + 1, torch.rand(4, 4), -torch.rand(4, 4), torch.zeros(3, 5)):
        expected = qparams_from_tensor(x, ACTIVATION_PER_TENSOR)
        scale, zero_point, _ = dynamic_tensor_qparams(x)
        scale_t, zero_point_t, _ = dynamic_tensor_qparams_torch(x)
        assert scale == float(expected.scale) == float(scale_t)
        assert zero_point == int(expected.zero_point) == int(zero_point_t)


def test_int8_asym_linear_is_close_to_float_and_marks_non_finite_tokens() -> None:
    layer = linear()
    x = torch.randn(64, 96)
    ref = layer(x).detach()
    module = Int8AsymLinear.from_float(layer)
    err = (module(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.017  # measured 0.0084 (seed 0; int8 per token: 0.0089)
    x[1, 4], x[2, 0] = float("nan"), float("inf")
    y = module(x)
    assert bool(torch.isnan(y[1:3]).all()) and bool(torch.isfinite(y[[0, *range(3, 64)]]).all())
    # only the finite values set the range: the other tokens come out as if the bad ones were absent
    kept = torch.cat([x[:1], x[3:]])
    assert torch.equal(y[[0, *range(3, 64)]], _asym_reference(module, kept))


def test_weight_only_modules_dequantize_their_codes() -> None:
    layer = linear()
    x = torch.randn(5, 96)
    w8 = W8Linear.from_float(layer)
    w8_weight = w8.weight.float() * w8.weight_scale.unsqueeze(1)
    assert torch.allclose(w8(x), x @ w8_weight.t() + layer.bias, rtol=1e-5, atol=1e-5)
    w4 = W4Linear.from_float(layer, group_size=32)
    codes = unpack_int4(w4.weight_packed, signed=True)
    assert int(codes.abs().max()) <= 7
    w4_weight = (codes.float().view(40, 3, 32) * w4.weight_scale.float().unsqueeze(-1)).view(40, 96)
    assert torch.equal(w4.dequantized_weight(), w4_weight)
    assert (w4_weight - layer.weight).abs().max() <= w4.weight_scale.float().max() / 2 * 1.001


def test_half_linear_computes_in_half() -> None:
    layer = linear()
    x = torch.randn(4, 96)
    for fmt, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        module = HalfLinear.from_float(layer, fmt)
        expected = nn.functional.linear(x.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype)).float()
        assert torch.equal(module(x), expected)


def test_bytes_are_exact_per_precision() -> None:
    layer = linear(k=96, n=40)
    n, k = 40, 96
    assert Int8DynamicLinear.from_float(layer).storage_bytes() == n * k + 4 * n + 4 * n
    assert Int8AsymLinear.from_float(layer).storage_bytes() == n * k + 4 * n + 4 * n
    assert W8Linear.from_float(layer).storage_bytes() == n * k + 4 * n + 4 * n
    assert W4Linear.from_float(layer, 32).storage_bytes() == n * k // 2 + 2 * n * (k // 32) + 4 * n
    assert HalfLinear.from_float(layer, "fp16").storage_bytes() == 2 * n * k + 2 * n


def test_embeddings_subtract_their_zero_points() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    with torch.no_grad():
        emb.weight += 3.0  # strongly asymmetric rows: a zero point matters
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    ref = emb(ids).detach()
    int8 = Int8Embedding.from_float(emb)
    table = dequantize(int8.weight, qparams_from_tensor(emb.weight.detach(),
                       QuantSpec(bits=8, signed=False, symmetric=False, granularity="group", group_size=64)))
    assert torch.equal(int8(ids), table[ids])
    assert (int8(ids) - ref).abs().max() < float(int8.weight_scale.max()) / 2 * 1.001
    w4 = W4Embedding.from_float(emb, group_size=32)
    assert (w4(ids) - ref).abs().max() <= float(w4.weight_scale.float().max()) / 2 * 1.01
    assert Int8Embedding.from_float(emb).storage_bytes() == 50 * (64 + 5)
    assert W4Embedding.from_float(emb).storage_bytes() == 50 * (32 + 3)
    assert HalfEmbedding.from_float(emb, "bf16")(ids).dtype == torch.float32


def test_modules_refuse_bad_inputs_clearly() -> None:
    module = Int8DynamicLinear.from_float(linear())
    with pytest.raises(InputError, match=r"\[\.\.\., 96\]"):
        module(torch.randn(2, 95))
    with pytest.raises(InputError, match="float32, float16, bfloat16 or float64"):
        module(torch.ones(2, 96, dtype=torch.int64))
    emb = Int8Embedding.from_float(nn.Embedding(10, 8))
    with pytest.raises(InputError, match=r"\[0, 9\]"):
        emb(torch.tensor([3, 10]))
    with pytest.raises(InputError, match="token ids"):
        emb(torch.tensor([1.0]))


def test_int8_static_linear_saturates_inf_marks_nan_and_matches_its_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = linear()
    x_qp = qparams_from_tensor(torch.randn(256, 96), QuantSpec(bits=8, signed=True, symmetric=False))
    module = Int8StaticLinear.from_float(layer, x_qp)
    x = torch.randn(4, 96)
    x[1, 0] = float("nan")
    x[2, 0] = float("inf")
    y = module(x)
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[[0, 2, 3]]).all())
    codes = quantize(x[[0, 3]], x_qp).long()
    acc = (codes - int(x_qp.zero_point)) @ module.weight.long().t()
    expected = acc.float() * (float(x_qp.scale) * module.weight_scale) + layer.bias.detach()
    assert torch.allclose(y[[0, 3]], expected, rtol=0, atol=2.4e-7)  # folded-bias rounding: measured 1.2e-7
    monkeypatch.setattr(native, "available", lambda: False)
    assert torch.equal(module(x).isnan(), y.isnan()) and torch.equal(module(x)[[0, 2, 3]], y[[0, 2, 3]])


def test_int8_linears_take_any_leading_shape_layout_and_float_dtype() -> None:
    layer = linear()
    x_qp = qparams_from_tensor(torch.randn(256, 96), QuantSpec(bits=8, signed=True, symmetric=False))
    for module in (Int8DynamicLinear.from_float(layer), Int8StaticLinear.from_float(layer, x_qp),
                   Int8AsymLinear.from_float(layer)):
        x = torch.randn(3, 96, 4).transpose(1, 2)  # [3, 4, 96], not contiguous
        y = module(x)
        assert y.shape == (3, 4, 40) and torch.equal(y, module(x.contiguous().reshape(12, 96)).reshape(3, 4, 40))
        assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_every_module_refuses_inputs_on_another_device() -> None:
    layer = linear()
    x_qp = qparams_from_tensor(torch.randn(256, 96), QuantSpec(bits=8, signed=True, symmetric=False))
    linears = [Int8DynamicLinear.from_float(layer), Int8StaticLinear.from_float(layer, x_qp),
               W8Linear.from_float(layer), W4Linear.from_float(layer, 32), HalfLinear.from_float(layer, "bf16")]
    for module in linears:
        with pytest.raises(InputError, match=r"runs on the CPU; move the input there \(x.cpu\(\)\), got meta"):
            module(torch.randn(2, 96, device="meta"))
    emb = nn.Embedding(10, 8)
    for module in (Int8Embedding.from_float(emb), W4Embedding.from_float(emb), HalfEmbedding.from_float(emb, "fp16")):
        with pytest.raises(InputError, match="runs on the CPU; move the token ids there"):
            module(torch.tensor([1, 2], device="meta"))
