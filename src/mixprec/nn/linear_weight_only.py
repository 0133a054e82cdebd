"""Weight-only int4 linear (``w4gN``); the int8 weight-only ``w8`` shares the int8
linears' storage and lives in :mod:`mixprec.nn.linear_int8`.

Activations stay float32; see :mod:`mixprec.kernels.weight_only` for the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixprec.formats import QuantSpec, fp16_scale, pack_int4
from mixprec.kernels import native
from mixprec.kernels.cpu import native_slow_path
from mixprec.kernels.weight_only import (
    W4_FALLBACK_KERNEL_NAME,
    W4_KERNEL_NAME,
    w4_dequantize_torch,
    w4_linear,
)
from mixprec.nn.base import QuantizedModule, as_float32_matrix, check_linear_input, restore_shape, round_weight


class W4Linear(QuantizedModule):
    """``w4gN``: int4 weights in groups of N along the input dimension, float32 activations.

    Codes are symmetric in [-7, 7], packed two per byte (see :mod:`mixprec.formats.int4`);
    each group has an fp16 scale ``max|w| / 7`` (rounded to fp16 first, then used for
    quantizing, and kept at or above 2**-14). Bytes per weight: 0.5 + 2 / N.
    Forward: ``y = x @ (codes * scale)^T + b`` in float32 (``codes * scale`` is exact).
    """

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
    def kernel(self) -> str:  # type: ignore[override]
        return W4_KERNEL_NAME if native.available() else W4_FALLBACK_KERNEL_NAME

    @property
    def slow_path(self) -> str | None:
        return native_slow_path()

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
        return w4_dequantize_torch(self.weight_packed, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        rows = as_float32_matrix(x)
        return restore_shape(w4_linear(rows, self.weight_packed, self.weight_scale, self.bias), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
