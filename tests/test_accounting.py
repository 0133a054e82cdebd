"""Byte accounting counts what each module's state dict carries, without converting layouts to count it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec
from mixprec.accounting import model_bytes, modules_with_tensors, own_bytes, tensor_holders
from mixprec.kernels import w4a8_linear
from mixprec.nn.conv import Int8Conv
from mixprec.nn.linear_int8 import Int8PackedLinear

LINEAR_PRECISIONS = ["bf16", "fp16", "int8", "int8-asym", "int8-tensor", "w8", "w8g32", "w4g32", "w4a8g32",
                     "w4a8g16"]


def model_of(precision: str, conv: str = "int8") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 48, 3), nn.Flatten(), nn.Linear(48 * 6 * 6, 96), nn.ReLU(),
                          nn.Linear(96, 2048), nn.Linear(2048, 2048))  # 96 outputs: blocked w4a8 pads to 128
    mixprec.quantize(model, mixprec.Policy([("0", conv)], default=precision))
    return model


def saved_bytes(module: nn.Module, recurse: bool) -> int:
    state = module.state_dict() if recurse else {}
    if not recurse:
        module._save_to_state_dict(state, "", keep_vars=True)
    return sum(t.nbytes for t in state.values())


@pytest.mark.parametrize("precision", LINEAR_PRECISIONS)
def test_bytes_are_the_state_dicts_without_converting_any_layout(precision: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_of(precision)
    expected = {name: saved_bytes(module, recurse=False) for name, module in model.named_modules()}
    total = saved_bytes(model, recurse=True)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layout was converted only to count bytes")

    monkeypatch.setattr(w4a8_linear, "from_blocked", refused)
    for packed in (Int8PackedLinear, Int8Conv):  # oneDNN's packed weights: not unpacked to be counted
        monkeypatch.setattr(packed, "weight_codes", refused)
    assert {name: own_bytes(module) for name, module in model.named_modules()} == expected
    assert model_bytes(model) == total
    assert [name for name, _ in modules_with_tensors(model)] == [name for name, size in expected.items() if size]
    assert sum(size for size, _ in tensor_holders(model).values()) == total
