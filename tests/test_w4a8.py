"""w4a8: int4 weights in groups times dynamic int8 activations (the VNNI kernel, the blocked layout's AVX2 form,
and the fallback)."""

from __future__ import annotations

import pytest
import torch
from cpu_kinds import AVX512_BUILD
from torch import nn

import mixprec
from mixprec import Policy, PolicyError
from mixprec.errors import InputError
from mixprec.formats import pack_int4, unpack_int4
from mixprec.kernels import native, quantize_per_token_symmetric_torch
from mixprec.kernels import w4a8_linear as w4a8
from mixprec.nn import W4A8Linear, W4Linear

needs_vnni = pytest.mark.skipif(not native.w4a8_available(), reason="the native build has no AVX512-VNNI kernel")
needs_blocked = pytest.mark.skipif(not native.w4a8_blocked_available(),
                                   reason="the native build has neither the AVX512-VNNI nor the AVX2 blocked kernel")

# (M, K, N, G): M = 1 and M not a multiple of the 6-row block, N not a multiple of the
# 32-channel block, K % 8 == 4 (a last single quad), group sizes 4 to 256; the shapes whose G is a
# multiple of 8 run the blocked layout too (groups of 1 to 32 eight-code lanes, K % 128 != 0).
SHAPES = [(1, 4, 1, 4), (3, 12, 33, 4), (13, 1028, 47, 4), (7, 64, 64, 32), (17, 4096, 100, 128), (40, 96, 70, 32),
          (6, 112, 31, 28), (2, 256, 96, 64), (1, 512, 37, 32), (4, 1024, 48, 256), (3, 384, 17, 128),
          (1, 576, 35, 32), (2, 96, 20, 32), (4, 1056, 18, 96)]

#: Largest difference, relative to the largest output, between the blocked layout's AVX2 kernel and the packed
#: layout's float32 fallback (the same codes, other roundings): measured at most 8.7e-8 over 20 seeds of a 96 x 40
#: layer.
ROUNDING_ONLY = 2e-7


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


def linear(xq: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None, blocked: bool) -> torch.Tensor:
    """The native kernel on the packed or the blocked layout of int4 ``codes [N, K]``."""
    packed = pack_int4(codes)
    if not blocked:
        return native.w4a8_linear(xq, x_scale, packed, scale, bias)
    n, k = codes.shape
    code_shape, scale_shape = w4a8.blocked_shapes(n, k, k // scale.shape[1])
    blocked_codes, blocked_scale = torch.empty(code_shape, dtype=torch.uint8), torch.empty(scale_shape).half()
    w4a8.to_blocked(packed, scale, blocked_codes, blocked_scale)
    return native.w4a8_linear_blocked(xq, x_scale, blocked_codes, blocked_scale, n, bias)


# Every shape on the packed layout, and on the blocked one where its group size allows it.
SHAPES_AND_LAYOUTS = [pytest.param(*shape, blocked, id=f"{'blocked' if blocked else 'packed'}-{shape}",
                                    marks=needs_blocked if blocked else needs_vnni)
                      for shape in SHAPES for blocked in (False, True)
                      if not blocked or w4a8.blocked_layout_applies(shape[3])]


def group_dots(xq: torch.Tensor, codes: torch.Tensor, group: int) -> torch.Tensor:
    """Exact integer dot products per group, int64 ``[M, N, K / G]``."""
    m, k = xq.shape
    n = codes.shape[0]
    return (xq.long().view(m, 1, k // group, group) * codes.long().view(1, n, k // group, group)).sum(-1)


@pytest.mark.parametrize("m,k,n,group,blocked", SHAPES_AND_LAYOUTS)
def test_integer_sums_equal_an_int64_reference_exactly(m: int, k: int, n: int, group: int, blocked: bool) -> None:
    # Unit scales: the output is the float32 sum of the exact group dot products, which is
    # exact while every partial sum stays below 2**24 (here at most 1024 * K <= 2**22).
    xq, codes = random_codes(m, k, n, seed=m * k + n)
    unit = torch.ones(n, k // group, dtype=torch.float16)
    y = linear(xq, torch.ones(m, 1), codes, unit, None, blocked)
    expected = xq.long() @ codes.long().t()
    assert torch.equal(y.double(), expected.double())


@pytest.mark.parametrize("m,k,n,group,blocked", SHAPES_AND_LAYOUTS)
def test_scaled_output_matches_a_float64_reference(m: int, k: int, n: int, group: int, blocked: bool) -> None:
    xq, codes = random_codes(m, k, n, seed=m + k * n)
    generator = torch.Generator().manual_seed(k)
    scale = (torch.rand(n, k // group, generator=generator) * 0.1 + 1e-3).half()
    x_scale = torch.rand(m, 1, generator=generator) * 0.02
    bias = torch.randn(n, generator=generator)
    y = linear(xq, x_scale, codes, scale, bias, blocked).double()
    terms = group_dots(xq, codes, group).double() * scale.double().unsqueeze(0)
    reference = terms.sum(-1) * x_scale.double() + bias.double()
    magnitude = terms.abs().sum(-1) * x_scale.double() + bias.double().abs()
    # float32 group sums, one rounding per group and one for the epilogue: measured at most
    # 2.14e-7 of sum |terms| over these shapes.
    assert float(((y - reference).abs() / magnitude).max()) < 4.2e-7


@pytest.mark.parametrize("blocked", [pytest.param(False, marks=needs_vnni), pytest.param(True, marks=needs_blocked)])
def test_each_row_gives_the_same_bits_in_any_batch(blocked: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(23, 256, generator=generator)
    packed = torch.randint(0, 256, (70, 128), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(70, 8, generator=generator) * 0.1).half()
    if blocked:
        codes_shape, scale_shape = w4a8.blocked_shapes(70, 256, 32)
        codes, blocked_scale = torch.empty(codes_shape, dtype=torch.uint8), torch.empty(scale_shape).half()
        w4a8.to_blocked(packed, scale, codes, blocked_scale)

    def run(rows: torch.Tensor) -> torch.Tensor:
        if blocked:
            return w4a8.w4a8_linear_blocked(rows, codes, blocked_scale, 70, None)
        return w4a8.w4a8_linear(rows, packed, scale, None)

    batch = run(x)
    for row in (0, 5, 6, 22):  # rows grouped otherwise than in the whole batch
        assert torch.equal(run(x[row:row + 1]), batch[row:row + 1])
    assert torch.equal(run(x[7:19]), batch[7:19])


@needs_vnni
@pytest.mark.parametrize("k,group", [(768, 32), (768, 64), (768, 128), (768, 256), (704, 32), (96, 8), (40, 8)])
def test_blocked_layout_gives_the_packed_layouts_bits(k: int, group: int) -> None:
    # The same codes in the two layouts, every row count from 1 (decoding) to 13: the same integer
    # group sums and float32 steps, hence the same bits; 83 channels: a partial last block of 32.
    generator = torch.Generator().manual_seed(group + k)
    x = torch.randn(13, k, generator=generator) * torch.logspace(-2, 2, k)
    packed = torch.randint(0, 256, (83, k // 2), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(83, k // group, generator=generator) * 0.1).half()
    bias = torch.randn(83, generator=generator)
    code_shape, scale_shape = w4a8.blocked_shapes(83, k, group)
    assert code_shape == (3, k // 8, 32, 4) and scale_shape == (3, k // group, 32)
    codes, blocked_scale = torch.empty(code_shape, dtype=torch.uint8), torch.empty(scale_shape).half()
    w4a8.to_blocked(packed, scale, codes, blocked_scale)
    assert all(torch.equal(a, b) for a, b in zip(w4a8.from_blocked(codes, blocked_scale, 83), (packed, scale)))
    assert not codes[2, :, 19:].any() and not blocked_scale[2, :, 19:].any()  # padding channels: code 0, scale 0
    with pytest.raises(ValueError, match="to_blocked needs a group size that divides K"):
        w4a8.to_blocked(packed, scale, codes[:2], blocked_scale)
    for rows in range(1, 14):
        expected = w4a8.w4a8_linear(x[:rows], packed, scale, bias)
        assert torch.equal(w4a8.w4a8_linear_blocked(x[:rows], codes, blocked_scale, 83, bias), expected), rows


@needs_blocked
def test_blocked_op_refuses_mismatched_operands() -> None:
    xq = torch.zeros(2, 64, dtype=torch.int8)
    codes = torch.zeros(1, 8, 32, 4, dtype=torch.uint8)
    scale = torch.ones(1, 2, 32, dtype=torch.float16)
    assert native.w4a8_linear_blocked(xq, torch.ones(2, 1), codes, scale, 20, None).shape == (2, 20)
    with pytest.raises(RuntimeError, match=r"codes must be a contiguous uint8 CPU tensor \[ceil\(N/32\), K/8, 32, 4\]"):
        native.w4a8_linear_blocked(xq, torch.ones(2, 1), codes, scale, 40, None)
    with pytest.raises(RuntimeError, match="group size G divisible by 8"):
        native.w4a8_linear_blocked(xq, torch.ones(2, 1), codes, torch.ones(1, 16, 32, dtype=torch.float16), 20, None)
    with pytest.raises(RuntimeError, match="x_scale must hold one float32 per row"):
        native.w4a8_linear_blocked(xq, torch.ones(3, 1), codes, scale, 20, None)
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        native.w4a8_linear_blocked(xq, torch.ones(2, 1), codes, scale, 20, torch.zeros(32))



def random_blocked(n: int, k: int, group: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight of ``n`` channels in the blocked layout (codes, float16 scales)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(n, k // group, generator=generator) * 0.1).half()
    code_shape, scale_shape = w4a8.blocked_shapes(n, k, group)
    codes, blocked_scale = torch.empty(code_shape, dtype=torch.uint8), torch.empty(scale_shape).half()
    w4a8.to_blocked(packed, scale, codes, blocked_scale)
    return codes, blocked_scale


@needs_blocked
@pytest.mark.parametrize("rows", [1, 5, 13])
def test_many_weights_in_one_call_give_each_single_calls_bits(rows: int) -> None:
    # 19 + 3 + 64 blocks of 32 channels (partial last blocks in the first two): more than 256 KiB in all, so two
    # threads split the sequence, the cut falling inside the third weight; biases on some weights only.
    generator = torch.Generator().manual_seed(rows)
    k, group, widths = 1024, 32, [600, 70, 2048]
    weights = [random_blocked(n, k, group, generator) for n in widths]
    biases = [torch.randn(600, generator=generator), None, torch.randn(2048, generator=generator)]
    xq = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=generator)
    x_scale = torch.rand(rows, 1, generator=generator)
    outputs = native.w4a8_linear_blocked_many(xq, x_scale, [c for c, _ in weights], [s for _, s in weights], widths,
                                              biases)
    assert len(outputs) == 3
    for (codes, scale), n, bias, y in zip(weights, widths, biases, outputs):
        assert torch.equal(y, native.w4a8_linear_blocked(xq, x_scale, codes, scale, n, bias)), n


@needs_blocked
def test_many_weights_op_refuses_mismatched_operands() -> None:
    generator = torch.Generator().manual_seed(0)
    xq, x_scale = torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1)
    (c32, s32), (c16, s16) = random_blocked(20, 64, 32, generator), random_blocked(20, 64, 16, generator)
    with pytest.raises(RuntimeError, match="one entry per weight"):
        native.w4a8_linear_blocked_many(xq, x_scale, [c32, c32], [s32], [20, 20], [None, None])
    with pytest.raises(RuntimeError, match="at least one"):
        native.w4a8_linear_blocked_many(xq, x_scale, [], [], [], [])
    with pytest.raises(RuntimeError, match="every weight must have the same group size: weight 1 has 16, weight 0 32"):
        native.w4a8_linear_blocked_many(xq, x_scale, [c32, c16], [s32, s16], [20, 20], [None, None])
    with pytest.raises(RuntimeError, match=r"codes must be a contiguous uint8 CPU tensor .* for N = 40"):
        native.w4a8_linear_blocked_many(xq, x_scale, [c32, c32], [s32, s32], [20, 40], [None, None])
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        native.w4a8_linear_blocked_many(xq, x_scale, [c32], [s32], [20], [torch.zeros(20, dtype=torch.float64)])

def test_module_holds_only_the_blocked_layout_and_checkpoints_the_packed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(96, 40)
    module, weight_only = W4A8Linear.from_float(layer, 32), W4Linear.from_float(layer, 32)
    assert module.blocked and set(dict(module.named_buffers())) == {"codes_blocked", "scale_blocked", "bias"}
    state = module.state_dict()
    assert set(state) == {"weight_packed", "weight_scale", "bias"}
    assert torch.equal(state["weight_packed"], weight_only.weight_packed)
    assert torch.equal(state["weight_scale"], weight_only.weight_scale)
    x = torch.randn(3, 96)
    packed_layout = module.relaid(blocked=False)
    assert not packed_layout.blocked
    if native.w4a8_available() or not native.w4a8_blocked_available():  # both layouts run one kernel: VNNI or PyTorch
        assert torch.equal(packed_layout(x), module(x))
    else:  # AVX2 runs the blocked layout only; the packed one's float32 fallback rounds otherwise
        assert float((packed_layout(x) - module(x)).abs().max()) <= ROUNDING_ONLY * float(module(x).abs().max())
    assert torch.equal(packed_layout.relaid(blocked=True)(x), module(x))
    fresh = W4A8Linear(96, 40, True, 32)
    fresh.load_state_dict(packed_layout.state_dict())
    assert torch.equal(fresh(x), module(x))
    with pytest.raises(RuntimeError, match=r"weight_packed: expected torch.uint8 \(40, 48\), got torch.uint8 \(40, 4"):
        fresh.load_state_dict({**state, "weight_packed": state["weight_packed"][:, :47]})
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({"bias": state["bias"]})
    with pytest.raises(ValueError, match="blocked w4a8 layout needs a group size divisible by 8, got 12"):
        W4A8Linear(96, 40, True, 12, blocked=True)
    assert not W4A8Linear(96, 40, True, 12).blocked
    native_output, had_native = module(x), native.w4a8_blocked_available()
    monkeypatch.setattr(native, "w4a8_available", lambda: False)  # the fallback reads the packed codes back
    monkeypatch.setattr(native, "w4a8_blocked_available", lambda: False)
    fallback_output = module(x)
    assert torch.equal(fallback_output, packed_layout(x))
    assert torch.equal(fallback_output, native_output) != had_native  # without a native kernel both ran the fallback


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
    had_native = native.w4a8_available()
    monkeypatch.setattr(native, "w4a8_available", lambda: False)
    slow = w4a8.w4a8_linear(x, packed, scale, bias)
    # Measured: native 8.7e-8 of sum |terms| (float32 sums of exact group dot products),
    # the fallback's float32 matmul over K 2.67e-7 (on a CPU without VNNI both calls run the fallback).
    for y, bound in ((fast, 1.7e-7 if had_native else 5.3e-7), (slow, 5.3e-7)):
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
    # float32 rounding only: measured 7.3e-8 of the largest output with AVX-512; with AVX2 (the w4 reference's sums
    # in 8 lanes) 1.5e-7, at most 1.6e-7 over 12 seeds
    bound = 1.4e-7 if AVX512_BUILD else 3.2e-7
    assert torch.allclose(module(x), expected, rtol=0, atol=bound * float(expected.abs().max()))
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
