"""Half-precision linears (``bf16``, ``fp16``).

Weight and bias are stored in the half format (round to nearest even). The input is
rounded to the same format, ``F.linear`` runs in it, and the output is returned in the
input's dtype. On x86 CPUs PyTorch sends bf16 GEMMs to oneDNN, which accumulates in
float32 and uses AVX512-BF16 or AMX-BF16 where the CPU has them, rounding the output to
bf16; fp16 GEMMs run natively only with AVX512-FP16 or AMX-FP16 and are otherwise
emulated through float32 conversion (correct, but slow). On CUDA GPUs both run on
tensor cores with float32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.formats import half_dtype, to_half
from mixprec.kernels.cpu import half_slow_path
from mixprec.kernels.huge_pages import zeros_in_huge_pages
from mixprec.nn.base import QuantizedModule, check_linear_input


class HalfLinear(QuantizedModule):
    """A linear layer stored and computed in bf16 or fp16."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str = "bf16") -> None:
        super().__init__()
        dtype = half_dtype(fmt)
        self.in_features, self.out_features = in_features, out_features
        self.precision = fmt
        self.kernel = f"{fmt} GEMM (float32 accumulation, {fmt} output)"
        self._slow_path = half_slow_path(fmt)
        self.overflow_count = 0
        self.register_buffer("weight", zeros_in_huge_pages((out_features, in_features), dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str) -> HalfLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt)
        converted = to_half(linear.weight, module.weight.dtype)
        module.weight = converted.tensor  # replaces the placeholder: no second copy
        module.overflow_count = converted.overflow_count
        if module.bias is not None:
            bias = to_half(linear.bias, module.bias.dtype)
            module.bias = bias.tensor
            module.overflow_count += bias.overflow_count
        return module

    @property
    def slow_path(self) -> str | None:
        return self._slow_path

    def dequantized_weight(self) -> Tensor:
        return self.weight.to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, precision={self.precision}"
