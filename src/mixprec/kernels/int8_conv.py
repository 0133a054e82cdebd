"""int8 convolution: uint8 activations x int8 weights, int32 accumulation, float32 output.

Arithmetic (both paths, bit for bit):

- activations: one scale ``s_x`` and zero point ``z`` for the whole input (asymmetric
  uint8 codes ``q = clamp(round_half_even(x / s_x) + z, 0, 255)``; zero padding is the
  code ``z``, i.e. a real zero);
- weights: int8 codes ``w`` in [-127, 127] with one float32 scale ``s_w[o]`` per output channel;
- ``acc[n, o, p] = sum (q - z) * w`` over the ``in_channels / groups x kernel`` window, exact
  in int32 for windows up to :data:`MAX_CONV_REDUCTION` elements;
- ``y = ((float32(acc) * s_x) * s_w[o]) + b[o]``, each step rounded to float32, then
  ``max(y, 0)`` when ReLU is fused.

Paths: oneDNN's u8 x s8 convolution on a weight prepacked once
(``torch.ops.onednn.qconv_prepack`` / ``qconv2d_pointwise``, VNNI here), channels-last,
with the rescale, bias and ReLU in its epilogue; and a PyTorch reference that computes
``acc`` with a float convolution on the integer values, exact because every partial sum is
an integer below 2**24 (float32) or 2**53 (float64). Tests pin the two together.
Conv1d runs as a Conv2d of height 1.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixprec.kernels import native
from mixprec.kernels.activation_quant import quantize_static_torch
from mixprec.kernels.cpu import cpu_flags
from mixprec.kernels.onednn_int8 import INT8_FLAGS

#: Longest window (``in_channels / groups x kernel`` elements) whose u8 x s8 sums provably fit
#: int32: ``255 * 127 * L < 2**31``.
MAX_CONV_REDUCTION = (2**31 - 1) // (255 * 127)
#: Longest window whose partial sums a float32 convolution holds exactly (``255 * 127 * L < 2**24``).
_FLOAT32_EXACT_REDUCTION = 2**24 // (255 * 127)

ONEDNN_KERNEL_NAME = "int8 convolution, int32 accumulation (oneDNN, prepacked weights, channels-last)"
REFERENCE_KERNEL_NAME = "int8 convolution, exact integer sums (PyTorch float convolution on the codes)"


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shape as a 2-D one (Conv1d: height 1): ``(height, width)`` pairs."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def lists(self) -> tuple[list[int], list[int], list[int]]:
        return list(self.stride), list(self.padding), list(self.dilation)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether oneDNN's prepacked int8 convolution exists and runs natively on this CPU."""
    has_ops = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    return bool(has_ops and cpu_flags() & set(INT8_FLAGS))


def slow_path() -> str | None:
    """Why int8 convolutions run the reference path here, or None."""
    if available():
        return None
    return (f"oneDNN's int8 convolution needs {' or '.join(INT8_FLAGS)} (not found); "
            "running the exact PyTorch reference (a float convolution on the codes)")


def quantize_samples_u8_torch(x: Tensor, samples: int, scale: float, zero_point: int) -> tuple[Tensor, Tensor]:
    """PyTorch-op path of ``native.quantize_samples_u8``: uint8 codes of a contiguous float32 ``x``
    made of ``samples`` equal blocks, and a flag per block (1.0, or NaN where it holds NaN)."""
    signed, flag = quantize_static_torch(x.reshape(samples, -1), scale, zero_point - 128)
    codes = signed.view(torch.uint8).bitwise_xor_(0x80)  # s + 128 (mod 256): the uint8 code
    return codes.reshape(x.shape), flag.reshape(samples)


def quantize_activation(x: Tensor, scale: float, zero_point: int) -> tuple[Tensor, Tensor]:
    """uint8 codes of a float32 ``x [N, C, H, W]`` in channels-last memory, and a per-sample flag.

    ``zero_point`` is the uint8 zero point (0..255). Codes follow the rounding rule above;
    +-inf and values beyond the range saturate. The flag ``[N]`` is 1.0 for samples without
    NaN and NaN for the others (their codes are meaningless; multiplying the output by the
    flag makes exactly those samples NaN). The fused C++ pass and the PyTorch ops give the
    same bits.
    """
    nhwc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    quantize = native.quantize_samples_u8 if native.available() else quantize_samples_u8_torch
    codes, flag = quantize(nhwc, x.shape[0], scale, zero_point)
    return codes.permute(0, 3, 1, 2), flag


def prepack(weight: Tensor, geometry: ConvGeometry) -> Tensor:
    """Pack an int8 ``[out, in / groups, kh, kw]`` weight for :func:`conv_onednn` (opaque tensor)."""
    stride, padding, dilation = geometry.lists
    unit = torch.ones(weight.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.onednn.qconv_prepack(weight.contiguous(), unit, 1.0, 0, stride, padding, dilation,
                                              geometry.groups, None)


def conv_onednn(codes: Tensor, x_scale: float, zero_point: int, packed: Tensor, weight_scale: Tensor,
                weight_zero_points: Tensor, bias: Tensor | None, geometry: ConvGeometry, relu: bool) -> Tensor:
    """oneDNN path: ``codes`` uint8 ``[N, C, H, W]`` (channels-last), float32 output (channels-last).

    ``weight_zero_points`` is int32 zeros ``[out]``, kept by the caller so no call allocates it.
    """
    stride, padding, dilation = geometry.lists
    return torch.ops.onednn.qconv2d_pointwise(codes, x_scale, zero_point, packed, weight_scale, weight_zero_points,
                                              bias, stride, padding, dilation, geometry.groups, 1.0, 0,
                                              torch.float32, "relu" if relu else "none", [], "")


def conv_accumulator(codes: Tensor, zero_point: int, weight: Tensor, geometry: ConvGeometry) -> Tensor:
    """``acc = sum (q - z) * w`` exactly, as a float tensor holding integers (reference path)."""
    window = weight[0].numel()
    dtype = torch.float32 if window <= _FLOAT32_EXACT_REDUCTION else torch.float64
    stride, padding, dilation = geometry.lists
    shifted = codes.to(dtype).sub_(zero_point)
    return F.conv2d(shifted, weight.to(dtype), None, stride, padding, dilation, geometry.groups)


def conv_reference(codes: Tensor, x_scale: float, zero_point: int, weight: Tensor, weight_scale: Tensor,
                   bias: Tensor | None, geometry: ConvGeometry, relu: bool) -> Tensor:
    """Reference path of :func:`conv_onednn` (same arguments, the dense int8 weight)."""
    acc = conv_accumulator(codes, zero_point, weight, geometry).to(torch.float32)
    y = acc.mul_(x_scale).mul_(weight_scale.reshape(1, -1, 1, 1))
    if bias is not None:
        y = y.add_(bias.reshape(1, -1, 1, 1))
    return y.relu_() if relu else y
