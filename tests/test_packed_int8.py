"""The oneDNN-packed int8 linear: same bits as the dense one, dense checkpoints, copies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import mixprec
from mixprec.kernels import native, onednn_int8
from mixprec.nn import Int8DynamicLinear, Int8PackedLinear, int8_dynamic_class

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
