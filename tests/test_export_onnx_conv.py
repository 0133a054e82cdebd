"""ONNX export of quantized convolutions: ONNX Runtime runs them with mixprec's arithmetic
(``int8`` / ``int8-static`` to the bit), whole CNNs match, the file keeps the stored codes, and
the precisions it cannot hold are refused by name with the nearest it can."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_runtime_int8 import needs_exact_int8
from torch import nn

import mixprec
from mixprec import ExportError, Policy
from mixprec.studies.cnn_models import DSCNN, ResNet8, seeded

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

GEOMETRIES: dict[str, Callable[[], nn.Module]] = {
    "strided": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
    "depthwise": lambda: nn.Conv2d(12, 12, 3, padding=1, groups=12),
    "dilated, reflect padding": lambda: nn.Conv2d(8, 6, (3, 2), dilation=(2, 1), padding=(2, 1),
                                                  padding_mode="reflect"),
    "same, even kernel": lambda: nn.Conv2d(8, 12, 2, padding="same"),
    "conv1d, no bias": lambda: nn.Conv1d(6, 10, 5, padding=2, bias=False),
    "odd weight count": lambda: nn.Conv2d(3, 5, 3, padding=1),  # 135 int4 codes: a padding nibble
}


#: A ``w4gN`` group size that divides each geometry's window (the odd windows, 9 and 27, have none).
GROUP_SIZES = {"strided": 8, "dilated, reflect padding": 16, "same, even kernel": 16, "conv1d, no bias": 10}


def stored_bytes(tensor: object) -> int:
    """An initializer's bytes as the file holds them (INT4: two values per byte)."""
    if tensor.data_type == onnx.TensorProto.INT4:
        return len(tensor.raw_data)
    return onnx.numpy_helper.to_array(tensor).nbytes


def run_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    mixprec.export(model, path, format="onnx", example=x[:1])
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def inputs_for(conv: nn.Module) -> torch.Tensor:
    """Four samples over three decades of scale (each call's int8 range is the batch's)."""
    shape = (4, conv.in_channels, 9, 9) if isinstance(conv, nn.Conv2d) else (4, conv.in_channels, 17)
    scale = torch.logspace(-2, 1, 4).reshape(4, *([1] * (len(shape) - 1)))
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scale + 0.2


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("precision", ["int8", "int8-static"])
def test_int8_convolutions_are_mixprecs_arithmetic_to_the_bit(geometry: str, precision: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    conv = GEOMETRIES[geometry]()
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = inputs_for(conv)
    report = mixprec.quantize(model, Policy(default=precision), calibration=[0.7 * x] if precision == "int8-static"
                              else None)
    assert report.layers[0].kernel.endswith("ReLU '1' fused")  # the ReLU is in the ONNX Relu after the rescale
    theirs = run_onnx(model, x, tmp_path / "m.onnx")
    with torch.no_grad():
        assert np.array_equal(theirs, model(x).numpy())


@pytest.mark.parametrize("precision", ["int8", "int8-static"])
def test_an_accumulator_beyond_float32s_integers_is_written_as_conv_integer(precision: str, tmp_path: Path) -> None:
    """Full-scale weights over a 2304-weight window can sum past 2**24 (255 * 127 * 2304): that
    layer goes to ``ConvInteger``; the small one beside it stays a float ``Conv`` of integers."""
    torch.manual_seed(0)
    wide, small = nn.Conv2d(256, 4, 3), nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        wide.weight.copy_(torch.randint(0, 2, wide.weight.shape) * 2.0 - 1.0)  # every code +-127
    model = nn.Sequential(wide, small).eval()
    x = torch.randn(3, 256, 6, 6, generator=torch.Generator().manual_seed(1)) + 1.0
    mixprec.quantize(model, Policy(default=precision), calibration=[x] if precision == "int8-static" else None)
    theirs = run_onnx(model, x, tmp_path / "m.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("ConvInteger") == 1 and ops.count("Conv") == 1
    with torch.no_grad():
        assert np.array_equal(theirs, model(x).numpy())


# measured over the five geometries, outputs up to 22: w8 1.9e-6 - 4.8e-6 (float32 sums in another order: up to
# 2.5 float32 ulps of the largest output); w4 / w4gN 1.9e-6 - 5.7e-6 (up to 3); fp16 0.0050 - 0.0084 (about half
# an fp16 ulp there)
ULPS = {"w8": 4.0, "w4": 4.0, "w4g": 4.0, "fp16": 1.0}


@pytest.mark.parametrize(("geometry", "precision"), [
    *[(geometry, precision) for geometry in GEOMETRIES for precision in ("w8", "w4", "fp16")],
    *[(geometry, f"w4g{group}") for geometry, group in GROUP_SIZES.items()],
])
def test_weight_only_and_half_convolutions_match(geometry: str, precision: str, tmp_path: Path) -> None:
    ulps = ULPS["w4g" if precision.startswith("w4g") else precision]
    torch.manual_seed(0)
    conv = GEOMETRIES[geometry]()
    model = nn.Sequential(conv).eval()
    x = inputs_for(conv)
    report = mixprec.quantize(model, Policy(default=precision))
    theirs = run_onnx(model, x, tmp_path / "m.onnx")
    with torch.no_grad():
        ours = model(x).numpy()
    largest = float(np.abs(ours).max())
    mantissa_bits = 10 if precision == "fp16" else 23
    ulp = 2.0 ** (np.floor(np.log2(largest)) - mantissa_bits)
    assert np.abs(theirs - ours).max() <= ulps * ulp
    initializers = onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    if precision.startswith("w4"):  # the codes as ONNX int4, two per byte
        codes = next(t for t in initializers if t.name.endswith(".w4_codes"))
        assert codes.data_type == onnx.TensorProto.INT4
        assert len(codes.raw_data) == (conv.weight.numel() + 1) // 2
    # mixprec's bytes; the w4 scales are stored fp16 by mixprec and float32 here (2 more bytes each)
    widened = 2 * sum(onnx.numpy_helper.to_array(t).size for t in initializers if t.name.endswith(".scales"))
    assert sum(stored_bytes(t) for t in initializers) == report.total_bytes + widened


@pytest.mark.parametrize(("make", "shape", "policy"), [
    pytest.param(ResNet8, (6, 1, 28, 28), Policy([(r"stem\..*", "int8-static"), (r"stack1\..*", "int8"),
                                                  (r"stack2\..*", "w8"), (r"stack3\..*", "w4"), ("head", "int8")]),
                 marks=needs_exact_int8),
    (DSCNN, (6, 1, 49, 10), Policy([(r"features\.0", "fp16"), (r"features\.(3|9|15|21)", "int8"),
                                    (r"features\.(6|12)", "w4g16")], default="w8")),
])
def test_whole_cnns_run_in_onnx_runtime(make: Callable[[], nn.Module], shape: tuple[int, ...], policy: Policy,
                                        tmp_path: Path) -> None:
    model = seeded(make, 0).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    report = mixprec.quantize(model, policy, calibration=[x])
    theirs = run_onnx(model, x, tmp_path / "m.onnx")
    with torch.no_grad():
        ours = model(x).numpy()
    # measured: 1.5e-8 (ResNet-8, logits up to 0.17), 3.7e-7 (DS-CNN, logits up to 0.10: its fp16 first
    # layer's outputs half an fp16 ulp apart, carried through the network)
    assert np.abs(theirs - ours).max() <= (2e-8 if make is ResNet8 else 1e-6)
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)  # ONNX's own checker, shapes inferred
    initializers = onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    widened = 2 * sum(onnx.numpy_helper.to_array(t).size for t in initializers if t.name.endswith(".scales"))
    # the codes as mixprec stores them (w4 scales as float32), plus the static layer's two scalars and the
    # graph's few small constants (shapes)
    assert sum(stored_bytes(t) for t in initializers) <= report.total_bytes + widened + 64


def test_bf16_convolutions_are_refused_by_name_with_the_nearest_held(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3)).eval()
    mixprec.quantize(model, Policy([("2", "bf16")], default="w4"))
    nearest = "use fp16 (ONNX Runtime's CPU provider has no bfloat16 Conv)"
    with pytest.raises(ExportError, match=rf"'2' \(conv, bf16\): {re.escape(nearest)}") as err:
        mixprec.export(model, tmp_path / "m.onnx", format="onnx", example=torch.randn(1, 4, 8, 8))
    assert "'0'" not in str(err.value)  # the w4 convolution is held
    assert not (tmp_path / "m.onnx").exists()
