"""Quantization-aware training: prepare_qat trains on quantize's grids, quantize then stores them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mixprec
from mixprec import FakeQuantLinear, Policy, PolicyError, prepare_qat

TRAINABLE = ["int8", "int8-asym", "w8", "w8g32", "w4", "w4g16", "w4a8g32", "bf16", "fp16"]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))


@pytest.mark.parametrize("precision", TRAINABLE)
def test_quantize_after_qat_stores_the_weights_the_last_forward_used(precision: str) -> None:
    model = _mlp()
    prepared = prepare_qat(model, precision)
    assert prepared == {"0": precision, "2": precision}
    x = torch.randn(5, 7, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # the weights move off their starting point, and keep training
        loss = model.train()(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        trained = [model[i].fake_weight().clone() for i in (0, 2)]
        fake_output = model.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16's emulated-GEMM note
        mixprec.quantize(model, precision)
    assert all(torch.equal(w, model[i].dequantized_weight()) for w, i in zip(trained, (0, 2)))
    with torch.no_grad():
        difference = float((model(x) - fake_output).abs().max())
    # same grids; what is left is float32 rounding order (int8: the exact integer GEMM rescaled
    # once, against a float product of the rounded values): measured <= 2.7e-7 on outputs near 1
    assert difference <= 1e-6, difference


def test_gradients_reach_the_float_weights_straight_through() -> None:
    model = _mlp()
    prepare_qat(model, Policy([("2", "w4g32")], default="int8"))
    parameters = list(model.parameters())
    assert len(parameters) == 4  # the same Parameter objects: an optimizer over them sees every one
    x = torch.randn(8, 64)
    out = model.train()(x)
    assert out.grad_fn is not None
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
    # straight through: the float weight gets the gradient its rounded value would get
    hidden = model[1](model[0](x)).detach()
    rounded = model[2].fake_weight().detach().requires_grad_()
    nn.functional.linear(hidden, rounded, model[2].bias.detach()).square().sum().backward()
    assert torch.allclose(model[2].weight.grad, rounded.grad, rtol=1e-6, atol=1e-6)


def test_layers_left_at_fp32_stay_plain_linears() -> None:
    model = _mlp()
    assert prepare_qat(model, Policy([("0", "fp32")], default="w8")) == {"2": "w8"}
    assert type(model[0]) is nn.Linear and isinstance(model[2], FakeQuantLinear)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_qat_refuses_what_it_cannot_train_naming_the_layer() -> None:
    with pytest.raises(PolicyError, match=r"layer '0': QAT cannot train int8-static: its activation scales come from "
                                          r"calibration: train with 'int8'"):
        prepare_qat(_mlp(), "int8-static")
    with pytest.raises(PolicyError, match="QAT cannot train int8-tensor"):
        prepare_qat(_mlp(), "int8-tensor")
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 8))
    with pytest.raises(PolicyError, match=r"layer '0' \(Embedding\): QAT trains nn.Linear layers only; leave it at "
                                          r"fp32 while training \(a rule \('0', 'fp32'\)\) and give it int8"):
        prepare_qat(model, "int8")
    assert type(model[1]) is nn.Linear  # nothing replaced before the refusal
    with pytest.raises(PolicyError, match="quantizes no layer of this model"):
        prepare_qat(_mlp(), "fp32")
    with pytest.raises(PolicyError, match="policy must be a mixprec.Policy"):
        prepare_qat(_mlp(), 8)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="takes a torch.nn.Module"):
        prepare_qat("model", "int8")  # type: ignore[arg-type]
    model = _mlp()
    prepare_qat(model, "int8")
    with pytest.raises(PolicyError, match="prepared for QAT already"):
        prepare_qat(model, "int8")


def test_quantize_refuses_a_policy_other_than_the_one_trained_for() -> None:
    model = _mlp()
    prepare_qat(model, "w4g32")
    with pytest.raises(PolicyError, match=r"layer '0' was trained for w4g32 \(prepare_qat\) but this policy gives it "
                                          r"int8: quantize with the policy you trained with"):
        mixprec.quantize(model, "int8")
    with pytest.raises(PolicyError, match="layer '2' was trained for w4g32 .* gives it fp32"):
        mixprec.quantize(model, Policy([("2", "fp32")], default="w4g32"))
    assert isinstance(model[0], FakeQuantLinear)  # refused before anything changed
    mixprec.quantize(model, "w4")  # Linear w4 is w4g32: the same grid
    assert model[0].precision == "w4g32"


def test_weight_scales_never_reach_zero() -> None:
    model = nn.Sequential(nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.zero_()
    prepare_qat(model, "w4g32")
    weight = model[0].fake_weight()
    assert torch.equal(weight, torch.zeros_like(weight)) and torch.isfinite(weight).all()
    out = model(torch.randn(3, 32))
    out.sum().backward()
    assert torch.isfinite(model[0].weight.grad).all()


def test_a_linear_without_bias_trains_and_quantizes() -> None:
    model = nn.Sequential(nn.Linear(32, 4, bias=False))
    prepare_qat(model, "w4g16")
    assert list(model.state_dict()) == ["0.weight"] and model[0].bias is None
    model(torch.randn(3, 32)).sum().backward()
    mixprec.quantize(model.eval(), "w4g16")
    assert model[0].bias is None and model[0].precision == "w4g16"


def test_to_float_keeps_the_trained_forward_on_plain_linears() -> None:
    model = _mlp()
    prepare_qat(model, Policy([("0", "w8")], default="bf16"))
    x = torch.randn(6, 64)
    with torch.no_grad():
        trained = model(x)
    assert mixprec.qat.to_float(model) == {"0": "w8", "2": "bf16"}
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))
        # weights on the grid: the layer's own rounding finds them again
        again = FakeQuantLinear(model[0], mixprec.precision.parse_precision("w8")).fake_weight()
        assert torch.equal(again, model[0].weight)
        # bf16 keeps its output rounding in the training forward only; the weights are bf16 values
        assert torch.equal(model[2].weight, model[2].weight.to(torch.bfloat16).float())
        assert (model(x) - trained).abs().max() < 1e-2
    with pytest.raises(PolicyError, match="holds no layer prepared by prepare_qat"):
        mixprec.qat.to_float(model)
