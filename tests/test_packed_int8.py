"""The int8 linears' weight layouts and few-row kernels: oneDNN-packed and dense give the same bits, dense
checkpoints, copies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import mixprec
from mixprec.kernels import native, onednn_int8
from mixprec.kernels.int8_linear import int8_linear_packed
from mixprec.nn import (
    Int8AsymLinear,
    Int8AsymPackedLinear,
    Int8DynamicLinear,
    Int8PackedLinear,
    Int8StaticLinear,
    Int8StaticPackedLinear,
    int8_dynamic_class,
)

pytestmark = pytest.mark.skipif(not onednn_int8.available(), reason="no VNNI/AMX int8 kernel in oneDNN here")


def layers() -> tuple[nn.Linear, Int8DynamicLinear, Int8PackedLinear]:
    torch.manual_seed(0)
    layer = nn.Linear(200, 72)
    return layer, Int8DynamicLinear.from_float(layer), Int8PackedLinear.from_float(layer)


def test_packed_and_dense_give_identical_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    _, dense, packed = layers()
    x = torch.randn(3, 5, 200)
    x[0, 1, 3] = float("nan")
    assert torch.equal(packed(x).isnan(), dense(x).isnan())
    assert torch.equal(packed(x).nan_to_num(), dense(x).nan_to_num())
    assert "oneDNN, prepacked" in packed.kernel
    monkeypatch.setattr(native, "available", lambda: False)
    assert torch.equal(packed(x).nan_to_num(), dense(x).nan_to_num())


@pytest.mark.parametrize(("out_features", "in_features"), [(72, 200), (64, 4), (130, 36), (256, 4100), (128, 2048)])
def test_few_rows_read_the_packed_weight_in_place_with_the_gemm_bits(out_features: int, in_features: int) -> None:
    # Up to 4 rows stream oneDNN's packed bytes (csrc/int8_packed_rows.cpp); oneDNN's own GEMM on the same
    # packed tensor is the reference: exact int32 sums, the same float32 epilogue, hence the same bits.
    if not native.int8_packed_rows_available():
        pytest.skip("no AVX512-VNNI or AVX2 kernel in this build")
    torch.manual_seed(out_features + in_features)
    layer = nn.Linear(in_features, out_features)
    layer.weight.data[0, :3] = torch.tensor([-50.0, 50.0, -50.0])  # codes -127/127 beside tiny ones
    packed = Int8PackedLinear.from_float(layer)
    assert packed._rows_in_place and "in place" in packed.kernel
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, in_features) * 4
        x[-1, -1] = 1e4  # one row whose codes are all 0 but one +-127
        for bias in (packed.bias, None):
            gemm = int8_linear_packed(x, packed._packed, packed._unit_scale, packed._zero_points,
                                      packed.weight_scale, bias, in_place_rows=False)
            rows_path = int8_linear_packed(x, packed._packed, packed._unit_scale, packed._zero_points,
                                           packed.weight_scale, bias, in_place_rows=True)
            assert torch.equal(rows_path.view(torch.int32), gemm.view(torch.int32)), (rows, bias is None)
    x = torch.randn(2, 3, in_features)
    x[1, 2, 0] = float("nan")
    assert torch.equal(packed(x[:1, :3]).nan_to_num(), Int8DynamicLinear.from_float(layer)(x[:1, :3]))
    assert torch.isnan(packed(x[1:, 2:])).all()


def test_a_packed_layout_the_kernel_cannot_read_is_reported_as_a_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native.int8_packed_rows_available():
        pytest.skip("no AVX512-VNNI or AVX2 kernel in this build")
    layer = nn.Linear(64, 64)
    assert Int8PackedLinear.from_float(layer).slow_path is None
    monkeypatch.setattr(native, "int8_packed_layout_matches", lambda weight, packed: False)
    other = Int8PackedLinear.from_float(layer)
    assert not other._rows_in_place and "layout mixprec's few-row kernel does not read" in other.slow_path
    x = torch.randn(2, 64)
    assert torch.equal(other(x), Int8DynamicLinear.from_float(layer)(x))  # oneDNN's GEMM: the same bits


def test_the_in_place_layout_check_refuses_another_weight_and_the_kernel_bad_input() -> None:
    if not native.int8_packed_rows_available():
        pytest.skip("no AVX512-VNNI or AVX2 kernel in this build")
    torch.manual_seed(3)
    weight = torch.randint(-128, 128, (128, 64), dtype=torch.int8)
    packed = onednn_int8.prepack(weight)
    assert onednn_int8.reads_in_place(weight, packed)
    changed = weight.clone()
    changed[70, 33] += 1  # one byte in the second block of channels
    assert not onednn_int8.reads_in_place(changed, packed)
    assert not onednn_int8.reads_in_place(weight[:, :60], packed)  # another shape: another byte count
    q = torch.full((1, 64), 128, dtype=torch.uint8)
    scales = torch.ones(1), torch.ones(128)
    assert torch.equal(native.int8_packed_rows(q, scales[0], packed, scales[1], None), torch.zeros(1, 128))
    with pytest.raises(RuntimeError, match="1 to 4 rows, got 5"):
        native.int8_packed_rows(q.expand(5, 64).contiguous(), torch.ones(5), packed, scales[1], None)
    with pytest.raises(RuntimeError, match="uint8 CPU codes"):
        native.int8_packed_rows(q.to(torch.int8), scales[0], packed, scales[1], None)
    with pytest.raises(RuntimeError, match="packed int8 tensor"):
        native.int8_packed_rows(q, scales[0], weight, scales[1], None)
    with pytest.raises(RuntimeError, match="holds 8704 bytes"):
        native.int8_packed_rows(q, scales[0], packed, torch.ones(256), None)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        native.int8_packed_rows(q, scales[0], packed, scales[1], torch.ones(3))


def test_state_dict_is_dense_and_holds_no_second_copy() -> None:
    _, dense, packed = layers()
    assert "weight" not in dict(packed.named_buffers())
    state = packed.state_dict()
    assert torch.equal(state["weight"], dense.weight) and packed.storage_bytes() == dense.storage_bytes()


def test_checkpoints_move_between_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "PACKED_MIN_WEIGHTS", 1)
    torch.manual_seed(1)
    build = lambda: nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))  # noqa: E731
    model = build()
    report = mixprec.quantize(model, "int8")
    assert isinstance(model[0], Int8PackedLinear) and "oneDNN" in report.layer("0").kernel
    assert report.total_bytes == 64 * 48 + 8 * 48 + 48 * 8 + 8 * 8
    mixprec.save(model, tmp_path / "m.safetensors")
    x = torch.randn(4, 64)
    packed_again = build()
    mixprec.load(packed_again, tmp_path / "m.safetensors")
    assert isinstance(packed_again[0], Int8PackedLinear) and torch.equal(packed_again(x), model(x))
    monkeypatch.setattr(onednn_int8, "PACKED_MIN_WEIGHTS", 1 << 40)
    dense = build()
    mixprec.load(dense, tmp_path / "m.safetensors")
    assert type(dense[0]) is Int8DynamicLinear and torch.equal(dense(x), model(x))


def test_deepcopy_and_load_refusal() -> None:
    _, _, packed = layers()
    clone = copy.deepcopy(packed)
    x = torch.randn(2, 200)
    assert torch.equal(clone(x), packed(x))
    with pytest.raises(RuntimeError, match="expected int8"):
        packed.load_state_dict({**packed.state_dict(), "weight": torch.zeros(72, 200)})


def test_dispatch_follows_the_measured_threshold() -> None:
    assert int8_dynamic_class(4096, 4096) is Int8PackedLinear
    assert int8_dynamic_class(384, 1536) is Int8DynamicLinear


def test_without_onednn_int8_everything_stays_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "available", lambda: False)
    assert int8_dynamic_class(4096, 4096) is Int8DynamicLinear



@pytest.mark.parametrize(("precision", "dense_class", "packed_class"), [
    ("int8-static", Int8StaticLinear, Int8StaticPackedLinear), ("int8-asym", Int8AsymLinear, Int8AsymPackedLinear)])
def test_packed_static_and_asym_give_the_dense_bits_checkpoints_and_onnx(
        precision: str, dense_class: type, packed_class: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Weights from PACKED_MIN_WEIGHTS up hold only oneDNN's pack; its GEMM on the codes + 128 (int8-static: up to 4
    # rows the in-place kernel; int8-asym: the call's zero point + 128 as oneDNN's source zero point) gives the
    # dense layer's bits; checkpoints and the ONNX export carry the dense codes.
    torch.manual_seed(3)
    build = lambda: nn.Sequential(nn.Linear(130, 72), nn.ReLU(), nn.Linear(72, 8))  # noqa: E731
    model = build()
    calibration = [torch.randn(32, 130) * 2] if precision == "int8-static" else None
    dense = copy.deepcopy(model)
    dense_report = mixprec.quantize(dense, precision, calibration=calibration)
    monkeypatch.setattr(onednn_int8, "PACKED_MIN_WEIGHTS", 1)
    report = mixprec.quantize(model, precision, calibration=calibration)
    assert type(dense[0]) is dense_class and isinstance(model[0], packed_class)
    assert "weight" not in model[0]._buffers and "oneDNN, prepacked" in report.layer("0").kernel
    assert report.total_bytes == dense_report.total_bytes  # dense bytes, not oneDNN's
    for rows in (1, 3, 4, 5, 64):
        x = torch.randn(rows, 130) * 3
        x[0, 0] = float("inf")
        if rows == 3:
            x[1, 5] = float("nan")
        with torch.no_grad():
            got, expected = model(x), dense(x)
        assert torch.equal(got.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32)), rows
        assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(model.state_dict()["0.weight"], dense.state_dict()["0.weight"])
    mixprec.save(model, tmp_path / "m.safetensors")
    x = torch.randn(4, 130)
    loaded = build()
    mixprec.load(loaded, tmp_path / "m.safetensors")
    assert isinstance(loaded[0], packed_class) and torch.equal(loaded(x), model(x))
    onnxruntime = pytest.importorskip("onnxruntime")
    mixprec.export(model, tmp_path / "m.onnx", format="onnx", example=x)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ort_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.equal(torch.from_numpy(ort_out), dense(x))  # both exports are bit-exact in ONNX Runtime


@pytest.mark.parametrize(("precision", "packed_class"), [("int8-static", Int8StaticPackedLinear),
                                                        ("int8-asym", Int8AsymPackedLinear)])
def test_packed_static_and_asym_compile_to_one_graph_with_the_eager_bits(precision: str, packed_class: type,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "PACKED_MIN_WEIGHTS", 1)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    mixprec.quantize(model, precision, calibration=[torch.randn(32, 256)] if precision == "int8-static" else None)
    assert isinstance(model[0], packed_class)
    for rows in (1, 9):  # the in-place few-row kernel, then oneDNN's GEMM
        x = torch.randn(rows, 256)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch._dynamo.reset()
        with torch.no_grad():
            assert torch.equal(torch.compile(model, dynamic=False)(x), model(x))
    torch._dynamo.reset()
