"""Weight-only quantized linears: int8 per channel (``w8``) and int4 per group (``w4gN``).

Activations stay float32; weights are expanded to float32 inside the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.formats import QParams, QuantSpec, pack_int4, qparams_from_tensor, quantize, unpack_int4
from mixprec.nn.base import QuantizedModule, check_linear_input
from mixprec.nn.linear_int8 import WEIGHT_PER_CHANNEL

#: fp16 is where group scales are stored; values are rounded to it before quantizing.
W4_SCALE_DTYPE = torch.float16
#: Smallest fp16 normal; group scales are kept at or above it.
W4_SCALE_MIN = 2.0**-14


class W8Linear(QuantizedModule):
    """``w8``: int8 weights (symmetric, per output channel), float32 activations.

    ``y = (x @ W_q^T) * s_w + b`` in float32: the int8 codes are converted exactly to
    float32, one matmul, then one multiply by the per-channel scale.
    """

    precision = "w8"
    kernel = "int8 weights -> float32 matmul, per-channel rescale"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> W8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        qp = qparams_from_tensor(linear.weight.detach(), WEIGHT_PER_CHANNEL)
        module.weight.copy_(quantize(linear.weight.detach(), qp))
        module.weight_scale.copy_(qp.scale)
        if module.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        y = F.linear(x.to(torch.float32), self.weight.to(torch.float32)).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype)


class W4Linear(QuantizedModule):
    """``w4gN``: int4 weights in groups of N along the input dimension, float32 activations.

    Codes are symmetric in [-7, 7], packed two per byte (see :mod:`mixprec.formats.int4`);
    each group has an fp16 scale ``max|w| / 7`` (rounded to fp16 first, then used for
    quantizing, and kept at or above 2**-14). Bytes per weight: 0.5 + 2 / N.
    Forward: ``W = codes * scale`` expanded to float32, then ``y = x @ W^T + b``.
    """

    kernel = "int4 weights unpacked to float32, float32 matmul"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.precision = f"w4g{group_size}"
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer(
            "weight_scale", torch.ones(out_features, in_features // group_size, dtype=W4_SCALE_DTYPE)
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=self.group_size)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> W4Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        weight = linear.weight.detach().to(torch.float32)
        qp = qparams_from_tensor(weight, module.spec)
        scale = qp.scale.clamp(min=W4_SCALE_MIN).to(W4_SCALE_DTYPE)
        if torch.isinf(scale).any():
            raise ValueError("weights beyond 7 * 65504 in magnitude have no fp16 group scale")
        qp = QParams(qp.spec, scale.to(torch.float32), qp.zero_point)
        module.weight_packed.copy_(pack_int4(quantize(weight, qp)))
        module.weight_scale.copy_(scale)
        if module.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the codes and scales represent, ``[out, in]``."""
        codes = unpack_int4(self.weight_packed, signed=True).to(torch.float32)
        groups = codes.view(self.out_features, -1, self.group_size)
        return (groups * self.weight_scale.to(torch.float32).unsqueeze(-1)).view(
            self.out_features, self.in_features
        )

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        return F.linear(x.to(torch.float32), self.dequantized_weight(), self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
