"""Quantized Conv1d / Conv2d: exact arithmetic per precision, the oneDNN path pinned to the
reference, storage bytes, save/load, and bad input."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec import InputError, Policy, PolicyError
from mixprec.formats import QuantSpec, dequantize, fp16_scale, qparams_from_range, qparams_from_tensor, quantize
from mixprec.kernels import int8_conv
from mixprec.nn import HalfConv, Int8Conv, Int8StaticConv, W4Conv, W8Conv
from mixprec.nn.linear_int8 import STATIC_ACTIVATION

#: (constructor, input shape): strides, dilation, groups, depthwise with a multiplier, Conv1d,
#: padding 'same' with an even kernel (uneven sides), reflect padding.
GEOMETRIES = [
    (lambda: nn.Conv2d(6, 10, 3, padding=1), (3, 6, 9, 11)),
    (lambda: nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False), (2, 6, 12, 9)),
    (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (2, 8, 10, 10)),
    (lambda: nn.Conv2d(4, 12, 3, padding=1, groups=4), (2, 4, 7, 7)),
    (lambda: nn.Conv2d(6, 6, 4, padding="same"), (2, 6, 8, 8)),
    (lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="reflect"), (2, 3, 8, 8)),
    (lambda: nn.Conv1d(6, 10, 5, stride=2, padding=2, dilation=1), (3, 6, 21)),
    (lambda: nn.Conv1d(8, 8, 3, padding="same", dilation=2, groups=8), (2, 8, 15)),
]


def _conv(index: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(index)
    make, shape = GEOMETRIES[index]
    conv = make().eval()
    return conv, torch.randn(shape) * 2 + 0.5


def _int8_expected(conv: nn.Module, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """An independent statement of the int8 arithmetic: codes by mixprec.formats, the integer sums
    by im2col in int64, then ((acc * s_x) * s_w) + b in float32."""
    weight_qp = qparams_from_tensor(conv.weight.detach().reshape(conv.out_channels, -1),
                                    QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0))
    w_codes = quantize(conv.weight.detach().reshape(conv.out_channels, -1), weight_qp).to(torch.int64)
    x_qp = mixprec.formats.QParams(STATIC_ACTIVATION, scale, zero_point)
    centred = (quantize(x, x_qp).to(torch.int64) - int(zero_point)).to(torch.float64)
    is_1d = isinstance(conv, nn.Conv1d)
    assert conv.padding_mode == "zeros" and not isinstance(conv.padding, str), "im2col here takes explicit padding"
    spatial = centred.unsqueeze(2) if is_1d else centred

    def pairs(values: tuple[int, ...]) -> tuple[int, ...]:
        return (1, values[0]) if is_1d else values

    kernel, stride, padding, dilation = (pairs(tuple(conv.kernel_size)), pairs(tuple(conv.stride)),
                                         (0, conv.padding[0]) if is_1d else tuple(conv.padding),
                                         pairs(tuple(conv.dilation)))
    columns = F.unfold(spatial, kernel, dilation=dilation, padding=padding, stride=stride).to(torch.int64)
    groups, out = conv.groups, conv.out_channels
    n, _, positions = columns.shape
    columns = columns.reshape(n, groups, -1, positions)
    weights = w_codes.reshape(groups, out // groups, -1)
    acc = torch.einsum("gok,ngkp->ngop", weights, columns).reshape(n, out, positions)
    y = acc.to(torch.float32) * scale
    y = y * weight_qp.scale.reshape(1, -1, 1)
    if conv.bias is not None:
        y = y + conv.bias.detach().reshape(1, -1, 1)
    return y.reshape(conv(x).shape)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 6])
def test_int8_dynamic_matches_an_independent_integer_reference(index: int) -> None:
    conv, x = _conv(index)
    module = Int8Conv.from_float(conv)
    low, high = torch.aminmax(x)
    qp = qparams_from_range(low, high, STATIC_ACTIVATION)
    assert torch.equal(module(x), _int8_expected(conv, x, qp.scale, qp.zero_point))


@pytest.mark.parametrize("index", range(len(GEOMETRIES)))
@pytest.mark.parametrize("static", [False, True])
def test_onednn_path_equals_the_reference_bit_for_bit(index: int, static: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not int8_conv.available():
        pytest.skip("oneDNN int8 convolution needs VNNI or AMX")
    conv, x = _conv(index)
    qp = qparams_from_range(torch.tensor(-1.5), torch.tensor(2.0), STATIC_ACTIVATION)
    build = (lambda: Int8StaticConv.from_float(conv, qp)) if static else (lambda: Int8Conv.from_float(conv))
    fast = build()
    monkeypatch.setattr(int8_conv, "available", lambda: False)
    reference = build()
    assert "_packed" in fast.__dict__ and "weight" in reference._buffers
    assert torch.equal(fast(x), reference(x))
    fast.fused_relu = reference.fused_relu = "relu"
    assert torch.equal(fast(x), reference(x)) and bool((fast(x) >= 0).all())
    assert torch.equal(fast.state_dict()["weight"], reference.state_dict()["weight"])


def test_static_codes_saturate_beyond_the_calibrated_range() -> None:
    conv, x = _conv(0)
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), STATIC_ACTIVATION)
    module = Int8StaticConv.from_float(conv, qp)
    assert bool((x.abs() > 2).any())  # well beyond the range: the codes saturate at 0 / 255
    assert torch.equal(module(x), _int8_expected(conv, x, qp.scale, qp.zero_point))


def test_non_finite_samples_come_out_nan_and_leave_the_others_alone() -> None:
    conv, x = _conv(0)
    dynamic = Int8Conv.from_float(conv)
    qp = qparams_from_range(*torch.aminmax(x), STATIC_ACTIVATION)
    static = Int8StaticConv.from_float(conv, qp)
    bad = x.clone()
    bad[1, 2, 3, 4] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    for module in (dynamic, static):
        y = module(bad)
        assert bool(y[1].isnan().all()) and bool(y[0].isfinite().all())
    assert bool(dynamic(bad)[2].isnan().all())  # dynamic: +-inf has no range either
    assert bool(static(bad)[2].isfinite().all())  # static: +-inf saturates
    finite = torch.cat((x[:1], x[3:]))
    assert torch.equal(static(bad)[[0]], static(finite)[[0]])


@pytest.mark.parametrize("index", range(len(GEOMETRIES)))
def test_weight_only_and_half_run_the_float_convolution_of_their_stored_weight(index: int) -> None:
    conv, x = _conv(index)
    reference = copy.deepcopy(conv)
    w8 = W8Conv.from_float(conv)
    channel = QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0)
    rows = conv.weight.detach().reshape(conv.out_channels, -1)
    qp = qparams_from_tensor(rows, channel)
    assert torch.equal(w8.dequantized_weight(), dequantize(quantize(rows, qp), qp).reshape(conv.weight.shape))
    with torch.no_grad():
        reference.weight.copy_(w8.dequantized_weight())
        assert torch.equal(w8(x), reference(x))
        w4 = W4Conv.from_float(conv)  # one group per output channel
        spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity="channel", axis=0)
        qp4 = qparams_from_tensor(rows, spec)
        qp4 = mixprec.formats.QParams(spec, fp16_scale(qp4.scale), qp4.zero_point)
        assert torch.equal(w4.dequantized_weight(), dequantize(quantize(rows, qp4), qp4).reshape(conv.weight.shape))
        reference.weight.copy_(w4.dequantized_weight())
        assert torch.equal(w4(x), reference(x))
        half = HalfConv.from_float(conv, "bf16")
        reference_bf16 = copy.deepcopy(conv).to(torch.bfloat16)
        assert torch.equal(half(x), reference_bf16(x.to(torch.bfloat16)).float())


def test_grouped_int4_runs_along_the_flattened_window() -> None:
    conv = nn.Conv2d(4, 6, 3, bias=False)  # window 36
    w4 = W4Conv.from_float(conv, group_size=12)
    assert w4.precision == "w4g12" and tuple(w4.weight_scale.shape) == (6, 3)
    rows = conv.weight.detach().reshape(6, -1)
    spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=12)
    qp = qparams_from_tensor(rows, spec)
    qp = mixprec.formats.QParams(spec, fp16_scale(qp.scale), qp.zero_point)
    assert torch.equal(w4.dequantized_weight(), dequantize(quantize(rows, qp), qp).reshape(6, 4, 3, 3))


def test_exact_bytes_per_precision() -> None:
    depthwise = nn.Conv2d(16, 16, 3, groups=16)  # window 9: 144 weights, 16 biases
    expected = {
        "int8": 144 + 16 * 4 + 16 * 4,
        "int8-static": 144 + 16 * 4 + 16 * 4 + 4 + 4,
        "w8": 144 + 16 * 4 + 16 * 4,
        "w4": math.ceil(144 / 2) + 16 * 2 + 16 * 4,
        "bf16": 144 * 2 + 16 * 2,
    }
    calibration = [torch.randn(2, 16, 6, 6)]
    for precision, size in expected.items():
        model = nn.Sequential(copy.deepcopy(depthwise))
        report = mixprec.quantize(model, precision, calibration=calibration if "static" in precision else None)
        assert report.total_bytes == size, precision
    odd = W4Conv.from_float(nn.Conv2d(1, 3, 3, bias=False))  # 27 codes: one pad nibble
    assert odd.weight_packed.numel() == 14


@pytest.mark.parametrize("precision", ["int8", "int8-static", "w8", "w4", "bf16", "fp16"])
def test_unbatched_input_and_save_load_copy_are_bit_identical(precision: str, tmp_path: Path) -> None:
    torch.manual_seed(0)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                             nn.Flatten(2), nn.Conv1d(8, 4, 3)).eval()

    x = torch.randn(2, 3, 8, 8)
    model = make()
    mixprec.quantize(model, precision, calibration=[x] if precision == "int8-static" else None)
    y = model(x)
    assert torch.equal(model[0](x[0]), model[0](x[:1])[0]) or precision == "int8"  # int8: range is per call
    mixprec.save(model, tmp_path / "m.safetensors")
    loaded = make()
    mixprec.load(loaded, tmp_path / "m.safetensors")
    assert torch.equal(loaded(x), y)
    assert torch.equal(copy.deepcopy(model)(x), y)
    assert model(x.double()).dtype == torch.float64


def test_a_cnn_policy_now_reaches_its_convolutions() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 16, 1))
    plans = {plan.name: plan.precision.name for plan in Policy([("0|4", "int8")], default="w8").plan(model)}
    assert plans == {"0": "int8", "3": "w8", "4": "int8"}


def test_bad_input_is_refused_with_what_would_fit() -> None:
    module = Int8Conv.from_float(nn.Conv2d(3, 4, 3))
    with pytest.raises(InputError, match=r"2-D convolution: it takes input of shape \[N, C, H, W\]"):
        module(torch.randn(3, 8))
    with pytest.raises(InputError, match="expects 3 input channels"):
        module(torch.randn(2, 5, 8, 8))
    with pytest.raises(InputError, match="takes float32, float16, bfloat16 or float64 input"):
        module(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(InputError, match="runs on the CPU"):
        module(torch.zeros(2, 3, 8, 8, device="meta"))
    with pytest.raises(InputError, match="1-D convolution"):
        W8Conv.from_float(nn.Conv1d(3, 4, 3))(torch.randn(2, 3, 8, 8))


def test_bad_policies_for_convolutions_name_the_layer_and_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    with pytest.raises(PolicyError, match=r"group size 4 does not divide the 9 weights in its window of layer '0'"
                                          r".*or w4, one group per output channel"):
        Policy([("0", "w4g4")], default="fp32").plan(model)
    with pytest.raises(PolicyError, match=r"'w4a8' is not valid for layer '1' \(Conv2d\); valid for Conv2d: "
                                          r"fp32, bf16, fp16, int8, int8-static, w8, w4"):
        Policy([("1", "w4a8")], default="fp32").plan(model)
    with pytest.raises(PolicyError, match="a convolution's int8 weights are per output channel: use w8"):
        Policy([("1", "w8g8")], default="fp32").plan(model)
    wide = nn.Sequential(nn.Conv1d(int8_conv.MAX_CONV_REDUCTION + 1, 1, 1))
    with pytest.raises(PolicyError, match="66312 weights in its window.*overflow-free only up to 66311"):
        Policy(default="int8").plan(wide)
    Policy(default="w8").plan(wide)


def test_fused_activation_quantization_equals_the_pytorch_ops() -> None:
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    torch.manual_seed(0)
    for shape in ((64, 28, 28, 16), (3, 5, 7, 3)):  # both cores, then one
        x = torch.randn(shape) * 3
        halves = (torch.arange(-600, 600, dtype=torch.float32) + 0.5) * 0.0123  # x / s at or next to ties
        x.view(-1)[-min(x.numel(), 1200):] = halves[:min(x.numel(), 1200)]
        x[1, 1, 2, 2] = float("nan")
        x[2, 0, 0, 0], x[0, 0, 0, 1], x[0, 1, 0, 0] = float("inf"), -float("inf"), 1e30
        for zero_point in (0, 17, 128, 255):
            fused = native.quantize_samples_u8(x, shape[0], 0.0123, zero_point)
            reference = int8_conv.quantize_samples_u8_torch(x, shape[0], 0.0123, zero_point)
            assert torch.equal(fused[0], reference[0])
            assert fused[1].isnan().nonzero().flatten().tolist() == [1]
            assert torch.equal(fused[1].nan_to_num(), reference[1].nan_to_num())
    bits = torch.randint(-2**31, 2**31 - 1, (4, 1003), dtype=torch.int32).view(torch.float32)  # every float class
    fused = native.quantize_samples_u8(bits, 4, 3e-3, 77)
    reference = int8_conv.quantize_samples_u8_torch(bits, 4, 3e-3, 77)
    assert torch.equal(fused[0], reference[0]) and fused[1].isnan().all() and reference[1].isnan().all()


def test_bytes_of_packed_weights_of_equal_size_are_each_counted() -> None:
    # unpacked on the fly for the count: a freed copy's address must not pass for a tied weight
    model = nn.Sequential(*[nn.Conv2d(64, 64, 1) for _ in range(4)])
    report = mixprec.quantize(model, "int8")
    assert report.total_bytes == 4 * (64 * 64 + 64 * 4 + 64 * 4)


def test_exports_without_convolutions_refuse_quantized_ones_by_name(tmp_path: Path) -> None:
    from mixprec import ExportError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    mixprec.quantize(model, Policy([("0", "int8")], default="fp32"))
    with pytest.raises(ExportError, match=r"'0' \(conv, int8\): use fp32 \(compressed-tensors export does not carry "
                                          r"quantized convolutions yet\)"):
        mixprec.export(model, tmp_path / "m", format="compressed-tensors")
    assert not (tmp_path / "m").exists()
