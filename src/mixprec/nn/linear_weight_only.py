"""Weight-only int4 linear (``w4gN``); the int8 weight-only ``w8`` shares the int8
linears' storage and lives in :mod:`mixprec.nn.linear_int8`.

Activations stay float32; weights are expanded to float32 inside the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.formats import QuantSpec, fp16_scale, pack_int4, unpack_int4
from mixprec.nn.base import QuantizedModule, check_linear_input, round_weight


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
            "weight_scale", torch.ones(out_features, in_features // group_size, dtype=torch.float16)
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=self.group_size)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, hessian: Tensor | None = None) -> W4Linear:
        """Quantize ``linear`` (GPTQ if ``hessian`` is given, else round to nearest)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        codes, qp = round_weight(linear.weight, module.spec, hessian, scale_fn=fp16_scale)
        module.weight_packed.copy_(pack_int4(codes))
        module.weight_scale.copy_(qp.scale)
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
