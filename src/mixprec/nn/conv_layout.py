"""The shape of a float ``nn.Conv1d`` / ``nn.Conv2d`` as quantized convolutions hold it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.errors import InputError
from mixprec.kernels.int8_conv import ConvGeometry

#: ``nn.Conv*`` padding modes and the ``F.pad`` mode each is.
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def is_conv(module: nn.Module) -> bool:
    """A plain ``nn.Conv1d`` or ``nn.Conv2d`` (not transposed, not a subclass with its own forward)."""
    return type(module) in (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class ConvLayout:
    """Geometry of a 1-D or 2-D convolution, with its padding split in two: ``pre_pad`` (``F.pad``
    amounts, last dimension first, in ``pad_mode``) runs before the convolution when the padding is
    uneven (``padding='same'`` with an even kernel) or not zeros; ``conv_padding`` (even, zeros)
    is the convolution's own."""

    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    conv_padding: tuple[int, ...]
    pre_pad: tuple[int, ...] | None
    pad_mode: str
    bias: bool

    @classmethod
    def of(cls, conv: nn.Module) -> ConvLayout:
        dims = 1 if isinstance(conv, nn.Conv1d) else 2
        kernel, dilation = tuple(conv.kernel_size), tuple(conv.dilation)
        if conv.padding == "valid":
            sides = [(0, 0)] * dims
        elif conv.padding == "same":
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            sides = [(t // 2, t - t // 2) for t in totals]
        else:
            sides = [(p, p) for p in conv.padding]
        even = all(left == right for left, right in sides)
        if conv.padding_mode == "zeros" and even:
            conv_padding, pre_pad = tuple(left for left, _ in sides), None
        else:
            conv_padding = (0,) * dims
            pre_pad = tuple(amount for side in reversed(sides) for amount in side)
        return cls(dims, conv.in_channels, conv.out_channels, kernel, tuple(conv.stride), dilation, conv.groups,
                   conv_padding, pre_pad, _PAD_MODES[conv.padding_mode], conv.bias is not None)

    @property
    def window(self) -> int:
        """Weights per output value: ``in_channels / groups x prod(kernel_size)``."""
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def geometry(self) -> ConvGeometry:
        """As a 2-D convolution (Conv1d: height 1, stride/dilation 1, no padding along it)."""
        pad = lambda values, fill: tuple(values) if self.dims == 2 else (fill, *values)  # noqa: E731
        return ConvGeometry(pad(self.stride, 1), pad(self.conv_padding, 0), pad(self.dilation, 1), self.groups)

    def describe(self) -> str:
        padding = self.conv_padding if self.pre_pad is None else f"{self.pre_pad} ({self.pad_mode}, before)"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={padding}, dilation={self.dilation}, groups={self.groups}")

    def check_input(self, x: Tensor, name: str) -> None:
        """Refuse what the float convolution would not take, saying what would fit."""
        if not isinstance(x, Tensor):
            raise InputError(f"{name} takes a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise InputError(f"{name} takes float32, float16, bfloat16 or float64 input, got {x.dtype}; "
                             "convert with x.float()")
        shape = "[N, C, L] or [C, L]" if self.dims == 1 else "[N, C, H, W] or [C, H, W]"
        if x.dim() not in (self.dims + 1, self.dims + 2):
            raise InputError(f"{name} is a {self.dims}-D convolution: it takes input of shape {shape}, "
                             f"got {x.dim()} dimensions {tuple(x.shape)}")
        if x.shape[-self.dims - 1] != self.in_channels:
            raise InputError(f"{name} expects {self.in_channels} input channels (shape {shape}), "
                             f"got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise InputError(f"{name} runs on the CPU; move the input there (x.cpu()), got {x.device}")

    def as_batch(self, x: Tensor) -> Tensor:
        """``x`` with a batch dimension, the uneven or non-zero padding applied."""
        if x.dim() == self.dims + 1:
            x = x.unsqueeze(0)
        return x if self.pre_pad is None else F.pad(x, self.pre_pad, mode=self.pad_mode)

    def float_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The float convolution of a batched, pre-padded ``x``."""
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, weight, bias, self.stride, self.conv_padding, self.dilation, self.groups)
