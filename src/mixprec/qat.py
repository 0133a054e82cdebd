"""Quantization-aware training: fine-tune a model through a policy, then :func:`mixprec.quantize` it.

:func:`prepare_qat` replaces each ``nn.Linear`` the policy quantizes with a
:class:`FakeQuantLinear` that keeps the float weight and bias as trainable parameters (the
same ``Parameter`` objects, so an optimizer built before still holds them) and computes its
forward on the values ``quantize`` will store:

=============  =====================================================================
precision      forward of the fake-quantized layer
=============  =====================================================================
int8           weight on ``int8``'s grid (symmetric int8 per output channel, scale
               ``max|row| / 127``); activations on ``int8``'s per-token grid (scale
               ``max(max|row| / 127, 2**-126)``, round half to even)
int8-asym      ``int8``'s weight; activations on one asymmetric grid for the whole
               input, recomputed each forward as ``quantize`` does
w8             the weight on ``w8``'s grid (as ``int8``), float activations
w8gN, w4gN     the weight on its groups' grid (symmetric, scale ``max|group| / 7`` or
               ``/ 127`` rounded to fp16, as ``quantize`` rounds it)
w4a8gN         ``w4gN``'s weight and ``int8``'s per-token activations
bf16, fp16     weight, bias, activations and output rounded to the half type, the
               product accumulated in float32
=============  =====================================================================

Rounding is straight-through: the forward uses the rounded value, the backward passes the
gradient to the float value unchanged. Scales are not learned: they follow the weights
(recomputed from the current float weight at every forward, by the rule ``quantize`` uses),
so a scale is never zero or negative: every scale is at least 2**-126 (an all-zero row or
group gets exactly that; fp16-scaled grids at least fp16's smallest normal, 2**-14).

After training, ``mixprec.quantize(model, policy)`` with the same policy rounds each float
weight exactly as the last forward did: the quantized layer's dequantized weight equals
the fake-quantized one bit for bit. ``quantize`` refuses a prepared layer whose precision
in the new policy differs from the one it was trained for. For toolchains that quantize a
float model themselves, :func:`to_float` instead leaves plain Linears holding the rounded
weights.

Trainable: Linear layers (and GPT-2-style ``Conv1D`` is not: prepare refuses it) in the
precisions above. Refused by name: ``int8-static`` (its activation ranges come from
calibration after training: train with ``int8``), ``int8-tensor``, and Embedding or
convolution layers at anything but ``fp32`` (leave them at ``fp32`` while training, e.g.
with a rule ``(r"embeddings\\..*", "fp32")``, and quantize them afterwards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.batchnorm import replace_module
from mixprec.errors import PolicyError
from mixprec.formats import QuantSpec, dequantize, fp16_scale
from mixprec.kernels.activation_quant import (
    dynamic_tensor_qparams_torch,
    quantize_per_token_symmetric_torch,
    quantize_static_torch,
)
from mixprec.nn.base import round_weight, w4_group_spec, w8_group_spec
from mixprec.nn.linear_int8 import WEIGHT_PER_CHANNEL
from mixprec.policy import LayerPlan, Policy
from mixprec.precision import DEFAULT_LINEAR_GROUP, Precision, built_name

#: Families :func:`prepare_qat` trains, and why the others are refused.
TRAINABLE = ("int8", "int8-asym", "w8", "w4", "w4a8", "bf16", "fp16")
_REFUSED = {
    "int8-static": "its activation scales come from calibration: train with 'int8', then quantize with "
                   "'int8-static' and calibration data",
    "int8-tensor": "it is a fake-quantization baseline, not a deployable precision: train with 'int8'",
}
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _straight_through(value: Tensor, rounded: Tensor) -> Tensor:
    """``rounded`` in the forward, the identity's gradient to ``value`` in the backward."""
    return value + (rounded - value).detach()


def _weight_grid(precision: Precision) -> QuantSpec | None:
    """The precision's integer weight grid (grouped grids keep fp16 scales), None for half precisions."""
    if precision.family in ("int8", "int8-asym", "w8") and precision.group_size is None:
        return WEIGHT_PER_CHANNEL
    if precision.family == "w8":
        return w8_group_spec(precision.group_size)
    if precision.family in ("w4", "w4a8"):
        return w4_group_spec(precision.group_size or DEFAULT_LINEAR_GROUP)
    return None


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` trained on the grid of ``precision`` (see the module docstring).

    Its ``state_dict`` is an ``nn.Linear``'s (``weight``, ``bias`` in float32).
    """

    def __init__(self, linear: nn.Linear, precision: Precision) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: optimizers keep working
        self.register_parameter("bias", linear.bias)
        self.precision = precision
        self._grid = _weight_grid(precision)
        self.training = linear.training

    def fake_weight(self) -> Tensor:
        """The weight ``quantize`` would store, as float32, with straight-through gradients."""
        if self._grid is None:
            return _straight_through(self.weight, self.weight.to(_HALF[self.precision.family]).to(torch.float32))
        grouped = self._grid.granularity == "group"  # fp16 scales, as the grouped modules store them
        codes, qparams = round_weight(self.weight, self._grid, scale_fn=fp16_scale if grouped else None)
        return _straight_through(self.weight, dequantize(codes, qparams))

    def fake_input(self, x: Tensor) -> Tensor:
        """``x`` as the quantized layer would see it: per-token int8 for ``int8`` / ``w4a8``, one
        asymmetric grid for the whole input for ``int8-asym``, rounded to the half type for
        ``bf16`` / ``fp16``, else unchanged."""
        family = self.precision.family
        if family in _HALF:
            return _straight_through(x, x.to(_HALF[family]).to(torch.float32))
        if family == "int8-asym":
            scale, zero_point, finite = dynamic_tensor_qparams_torch(x.detach().to(torch.float32))
            codes, _ = quantize_static_torch(finite, scale, zero_point)
            return _straight_through(x, (codes.to(torch.float32) - zero_point) * scale)
        if family not in ("int8", "w4a8"):
            return x
        rows = x.detach().reshape(-1, self.in_features).to(torch.float32)
        codes, scale = quantize_per_token_symmetric_torch(rows)
        return _straight_through(x, (codes.to(torch.float32) * scale).reshape(x.shape))

    def forward(self, x: Tensor) -> Tensor:
        half = _HALF.get(self.precision.family)
        if half is None:
            return F.linear(self.fake_input(x), self.fake_weight(), self.bias)
        bias = None if self.bias is None else _straight_through(self.bias, self.bias.to(half).to(torch.float32))
        y = F.linear(self.fake_input(x), self.fake_weight(), bias)
        return _straight_through(y, y.to(half).to(torch.float32))  # the half layer's output rounding

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, precision={self.precision.name} (quantization-aware training)"


def prepare_qat(model: nn.Module, policy: Policy | str) -> dict[str, str]:
    """Replace every Linear layer ``policy`` quantizes with a :class:`FakeQuantLinear`, in place.

    Every layer is checked before the first is replaced. Returns ``{layer name: precision}``
    of the prepared layers. Train the model as usual (it is left in its current mode), then
    call ``mixprec.quantize(model, policy)`` with the same policy.

    Raises:
        PolicyError: a precision or layer kind QAT does not train (named, with what to do),
            a model prepared already, or a policy that quantizes no Linear layer.
    """
    if isinstance(policy, str):
        policy = Policy(default=policy)
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a mixprec.Policy or a precision name, got {type(policy).__name__}")
    if not isinstance(model, nn.Module):
        raise PolicyError(f"prepare_qat takes a torch.nn.Module, got {type(model).__name__}")
    prepared = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    if prepared:
        raise PolicyError(f"the model is prepared for QAT already (layer {prepared[0]!r}); prepare it once")
    plans = [plan for plan in policy.plan(model) if plan.precision.family != "fp32"]
    for plan in plans:
        family = plan.precision.family
        if family in _REFUSED:
            raise PolicyError(f"layer {plan.name!r}: QAT cannot train {plan.precision.name}: {_REFUSED[family]}")
        if type(plan.module) is not nn.Linear:
            raise PolicyError(
                f"layer {plan.name!r} ({type(plan.module).__name__}): QAT trains nn.Linear layers only; leave it at "
                f"fp32 while training (a rule ({plan.name!r}, 'fp32')) and give it {plan.precision.name} when you "
                "quantize")
    if not plans:
        raise PolicyError("the policy quantizes no layer of this model: nothing to train for")
    for plan in plans:
        replace_module(model, plan.name, FakeQuantLinear(plan.module, plan.precision))
    return {plan.name: plan.precision.name for plan in plans}


def to_float(model: nn.Module) -> dict[str, str]:
    """Turn every :class:`FakeQuantLinear` of ``model`` into an ``nn.Linear`` holding its
    rounded weight (and, for bf16 / fp16, its rounded bias), in place: the float model the
    training forward computed, for toolchains that quantize a float model themselves (the
    integer engine's builders, a TFLite or ONNX converter): a per-channel int8 quantizer with
    the same rule (scale ``max|row| / 127``) finds exactly these values on its grid again.
    Returns ``{layer name: precision}`` of the layers converted.

    Raises:
        PolicyError: ``model`` holds no prepared layer.
    """
    prepared = {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}
    if not prepared:
        raise PolicyError("the model holds no layer prepared by prepare_qat: nothing to convert")
    with torch.no_grad():
        for name, module in prepared.items():
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.copy_(module.fake_weight())
            if module.bias is not None:
                half = _HALF.get(module.precision.family)
                linear.bias.copy_(module.bias if half is None else module.bias.to(half).to(torch.float32))
            linear.train(module.training)
            replace_module(model, name, linear)
    return {name: module.precision.name for name, module in prepared.items()}


def release(model: nn.Module, plans: list[LayerPlan]) -> bool:
    """Check that each prepared layer gets the precision it was trained for, then turn every
    :class:`FakeQuantLinear` back into an ``nn.Linear`` holding the trained parameters (what
    :func:`mixprec.quantize` rounds). ``plans`` are ``quantize``'s layer plans. Returns whether
    any layer was prepared (the plans then name modules that left the model: plan again)."""
    decided = {plan.name: built_name(plan.module, plan.precision) for plan in plans}
    prepared = {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}
    for name, module in prepared.items():
        given = decided.get(name, "fp32")
        if given != built_name(module, module.precision):
            raise PolicyError(f"layer {name!r} was trained for {module.precision.name} (prepare_qat) but this policy "
                              f"gives it {given}: quantize with the policy you trained with")
    for name, module in prepared.items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        linear.train(module.training)
        replace_module(model, name, linear)
    return bool(prepared)
