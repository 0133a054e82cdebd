"""Quantized ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, dilation and groups, depthwise
included): ``bf16`` / ``fp16``, weight-only ``w8`` and ``w4`` / ``w4gN``, and int8 x int8
``int8`` (dynamic activations) / ``int8-static`` (calibrated activations).

Weights keep ``nn.Conv``'s layout ``[out, in / groups, *kernel]``. Grouped int4 scales run
along each output channel's flattened window (``in / groups x kernel`` weights, the order of
``weight.reshape(out, -1)``); ``w4`` on a convolution is one group per output channel.
Every module returns its input's dtype and takes unbatched inputs as ``nn.Conv`` does.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import Tensor, nn

from mixprec.formats import QuantSpec, fp16_scale, half_dtype, to_half, unpack_int4
from mixprec.formats.affine import QParams
from mixprec.kernels import int8_conv
from mixprec.kernels.activation_quant import dynamic_tensor_qparams
from mixprec.kernels.huge_pages import zeros_in_huge_pages
from mixprec.kernels.int8_conv import MAX_CONV_REDUCTION
from mixprec.nn.base import PackedWeightMixin, QuantizedModule, round_weight, round_weight_int4_packed, w4_group_spec
from mixprec.nn.conv_layout import ConvLayout
from mixprec.nn.linear_int8 import STATIC_ACTIVATION, WEIGHT_PER_CHANNEL


class QuantizedConv(QuantizedModule):
    """Common ground: the layout, input checks, batching and the float bias."""

    #: Name of the BatchNorm folded into this convolution by :func:`mixprec.quantize` (now an
    #: ``nn.Identity`` in the model), or None.
    folded_batchnorm: str | None = None

    def __init__(self, layout: ConvLayout, precision: str) -> None:
        super().__init__()
        self.layout = layout
        self.precision = precision

    def forward(self, x: Tensor) -> Tensor:
        self.layout.check_input(x, type(self).__name__)
        unbatched = x.dim() == self.layout.dims + 1
        y = self.convolve(self.layout.as_batch(x))
        y = y.squeeze(0) if unbatched else y
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def convolve(self, x: Tensor) -> Tensor:
        """The convolution of a batched, pre-padded input of any float dtype."""
        raise NotImplementedError

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the stored values represent, ``[out, in / groups, *kernel]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.layout.describe()}, precision={self.precision}"


class HalfConv(QuantizedConv):
    """``bf16`` / ``fp16``: weight and bias rounded to the half format (to nearest even), the input
    rounded to it, the convolution run in it (oneDNN; fp16 is emulated without AVX512-FP16)."""

    def __init__(self, layout: ConvLayout, fmt: str = "bf16") -> None:
        super().__init__(layout, fmt)
        dtype = half_dtype(fmt)
        self.kernel = f"{fmt} convolution (float32 accumulation, {fmt} output)"
        self.overflow_count = 0
        self.register_buffer("weight", zeros_in_huge_pages(layout.weight_shape, dtype))
        self.register_buffer("bias", torch.zeros(layout.out_channels, dtype=dtype) if layout.bias else None)

    @classmethod
    def from_float(cls, conv: nn.Module, fmt: str) -> Self:
        module = cls(ConvLayout.of(conv), fmt)
        weight = to_half(conv.weight, module.weight.dtype)
        module.weight, module.overflow_count = weight.tensor, weight.overflow_count
        if conv.bias is not None:
            bias = to_half(conv.bias, module.weight.dtype)
            module.bias = bias.tensor
            module.overflow_count += bias.overflow_count
        return module

    def dequantized_weight(self) -> Tensor:
        return self.weight.to(torch.float32)

    def convolve(self, x: Tensor) -> Tensor:
        return self.layout.float_conv(x.to(self.weight.dtype), self.weight, self.bias)


class _Int8WeightConv(QuantizedConv):
    """int8 weight codes ``[out, in / groups, *kernel]`` in [-127, 127], float32 scales ``[out]``
    (``max|w| / 127`` per output channel), float32 bias."""

    def __init__(self, layout: ConvLayout, precision: str) -> None:
        super().__init__(layout, precision)
        self.register_buffer("weight", zeros_in_huge_pages(layout.weight_shape, torch.int8))
        self.register_buffer("weight_scale", torch.ones(layout.out_channels))
        self.register_buffer("bias", torch.zeros(layout.out_channels) if layout.bias else None)

    def _set_weight(self, conv: nn.Module) -> None:
        rows = conv.weight.detach().reshape(self.layout.out_channels, -1)
        codes, qp = round_weight(rows, WEIGHT_PER_CHANNEL)
        self._store_codes(codes.reshape(self.layout.weight_shape))
        self.weight_scale.copy_(qp.scale)
        if self.bias is not None:
            self.bias.copy_(conv.bias.detach())

    def _store_codes(self, codes: Tensor) -> None:
        self.weight.copy_(codes)

    def weight_codes(self) -> Tensor:
        """The int8 weight codes, ``[out, in / groups, *kernel]``."""
        return self.weight

    def dequantized_weight(self) -> Tensor:
        scale = self.weight_scale.reshape(-1, *([1] * (self.layout.dims + 1)))
        return self.weight_codes().to(torch.float32) * scale


class W8Conv(_Int8WeightConv):
    """``w8``: int8 weights per output channel, float32 activations: the codes are expanded
    exactly to ``codes * scale`` in float32 on each call (a convolution's weight is small) and a
    float32 convolution runs."""

    kernel = "int8 weights expanded to float32 per call, float32 convolution"

    @classmethod
    def from_float(cls, conv: nn.Module) -> Self:
        module = cls(ConvLayout.of(conv), "w8")
        module._set_weight(conv)
        return module

    def convolve(self, x: Tensor) -> Tensor:
        return self.layout.float_conv(x.to(torch.float32), self.dequantized_weight(), self.bias)


class W4Conv(QuantizedConv):
    """``w4`` (one group per output channel) / ``w4gN``: int4 codes in [-7, 7] with an fp16 scale
    per group of N weights of an output channel's flattened window (``max|w| / 7``, rounded to
    fp16 first, kept at or above 2**-14). All codes of the weight are packed two per byte in
    ``weight.reshape(-1)`` order (one zero nibble pads an odd count). Forward: the codes are
    expanded exactly to ``codes * scale`` in float32 and a float32 convolution runs."""

    kernel = "int4 weights expanded to float32 per call, float32 convolution"

    def __init__(self, layout: ConvLayout, group_size: int | None = None) -> None:
        super().__init__(layout, "w4" if group_size is None else f"w4g{group_size}")
        self.group_size = group_size or layout.window
        if layout.window % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the window of {layout.window} weights")
        count = layout.out_channels * layout.window
        self.register_buffer("weight_packed", zeros_in_huge_pages(((count + 1) // 2,), torch.uint8))
        self.register_buffer("weight_scale",
                             torch.ones(layout.out_channels, layout.window // self.group_size, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(layout.out_channels) if layout.bias else None)

    @property
    def spec(self) -> QuantSpec:
        if self.group_size == self.layout.window:  # one group per output channel, whatever its length
            return QuantSpec(bits=4, signed=True, symmetric=True, granularity="channel", axis=0)
        return w4_group_spec(self.group_size)

    @classmethod
    def from_float(cls, conv: nn.Module, group_size: int | None = None) -> Self:
        module = cls(ConvLayout.of(conv), group_size)
        rows = conv.weight.detach().reshape(module.layout.out_channels, -1)
        packed, qp = round_weight_int4_packed(rows, module.spec, scale_fn=fp16_scale)
        module.weight_packed.copy_(packed)
        module.weight_scale.copy_(qp.scale.reshape(module.weight_scale.shape))
        if module.bias is not None:
            module.bias.copy_(conv.bias.detach())
        return module

    def dequantized_weight(self) -> Tensor:
        layout = self.layout
        codes = unpack_int4(self.weight_packed, signed=True)[: layout.out_channels * layout.window]
        groups = codes.reshape(layout.out_channels, -1, self.group_size).to(torch.float32)
        weight = groups * self.weight_scale.to(torch.float32).unsqueeze(-1)
        return weight.reshape(layout.weight_shape)

    def convolve(self, x: Tensor) -> Tensor:
        return self.layout.float_conv(x.to(torch.float32), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Int8Conv(PackedWeightMixin, _Int8WeightConv):
    """``int8``: int8 x int8 convolution with int32 accumulation (see
    :mod:`mixprec.kernels.int8_conv` for the exact arithmetic).

    Activations: asymmetric uint8 per tensor, the range taken from the whole input of each call
    (so one sample's output depends on the batch's range, as in PyTorch's dynamic
    quantization); ``s_x = (max' - min') / 255`` with ``min' = min(min, 0)``,
    ``max' = max(max, 0)``, zero point ``-round(min' / s_x)``. A sample holding NaN or +-inf
    gives an all-NaN output; the range is then taken from the finite values.

    On CPUs with VNNI or AMX the weight is held only in oneDNN's prepacked layout
    (``state_dict()`` unpacks it to the dense int8 tensor; bytes count the dense size).
    """

    #: Name of the ``nn.ReLU`` that :func:`mixprec.quantize` fused into this convolution (applied
    #: as ``max(y, 0)`` in its epilogue; the ReLU is then an ``nn.Identity``), or None.
    fused_relu: str | None = None

    def __init__(self, layout: ConvLayout, precision: str = "int8") -> None:
        if layout.window > MAX_CONV_REDUCTION:
            raise ValueError(f"a window of {layout.window} weights exceeds {MAX_CONV_REDUCTION}, the longest whose "
                             "int32 accumulator cannot overflow")
        super().__init__(layout, precision)
        self._geometry = layout.geometry
        self._weight_zero_points = torch.zeros(layout.out_channels, dtype=torch.int32)
        if int8_conv.available():
            self._store_codes(self._buffers.pop("weight"))

    @classmethod
    def from_float(cls, conv: nn.Module) -> Self:
        module = cls(ConvLayout.of(conv))
        module._set_weight(conv)
        return module

    @property
    def kernel(self) -> str:  # type: ignore[override]
        name = int8_conv.ONEDNN_KERNEL_NAME if int8_conv.available() else int8_conv.REFERENCE_KERNEL_NAME
        return name + (f"; ReLU {self.fused_relu!r} fused" if self.fused_relu else "")

    @property
    def slow_path(self) -> str | None:
        return int8_conv.slow_path()

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        return self.layout.weight_shape

    def _store_codes(self, codes: Tensor) -> None:
        if "weight" in self._buffers:
            self.weight.copy_(codes)
        else:
            self._packed = int8_conv.prepack(self._as_2d(codes), self._geometry)

    def weight_codes(self) -> Tensor:
        if "weight" in self._buffers:
            return self.weight
        return self._packed.to_dense().reshape(self.layout.weight_shape)

    def _as_2d(self, weight: Tensor) -> Tensor:
        return weight.unsqueeze(2) if self.layout.dims == 1 else weight

    def activation_qparams(self, x: Tensor) -> tuple[float, int, Tensor]:
        """``(s_x, uint8 zero point, x)`` for this call: see :func:`dynamic_tensor_qparams`."""
        scale, zero_point, x = dynamic_tensor_qparams(x)
        return scale, zero_point + 128, x

    #: Run outside ``torch.compile``'s graphs: each call's range is read back on the host for
    #: oneDNN's scalar arguments. Traced, the read broke the graph, and the convolutions'
    #: frames, recompiled per channel count, failed in Inductor's int8 convolution lowering.
    forward = torch.compiler.disable(QuantizedConv.forward)

    def convolve(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        scale, zero_point, x = self.activation_qparams(x)
        return self._int8_convolve(x, scale, zero_point)

    def _int8_convolve(self, x: Tensor, scale: float, zero_point: int) -> Tensor:
        spatial = x.unsqueeze(2) if self.layout.dims == 1 else x
        codes, sample_flag = int8_conv.quantize_activation(spatial, scale, zero_point)
        if "weight" in self._buffers:
            y = int8_conv.conv_reference(codes, scale, zero_point, self._as_2d(self.weight), self.weight_scale,
                                         self.bias, self._geometry, self.fused_relu is not None)
        else:
            y = int8_conv.conv_onednn(codes, scale, zero_point, self._packed, self.weight_scale,
                                      self._weight_zero_points, self.bias, self._geometry, self.fused_relu is not None)
        if torch.compiler.is_compiling() or torch.isnan(sample_flag).any():  # traced: no data-dependent branch
            y = y.mul(sample_flag.reshape(-1, 1, 1, 1))
        return y.squeeze(2) if self.layout.dims == 1 else y


class Int8StaticConv(Int8Conv):
    """``int8-static``: :class:`Int8Conv` with the activations' scale and zero point fixed at
    calibration (per tensor, asymmetric; stored as int8 ``[-128, 127]`` parameters, the uint8
    zero point is that plus 128). Inputs beyond the calibrated range, +-inf included,
    saturate; a sample holding NaN gives an all-NaN output."""

    def __init__(self, layout: ConvLayout) -> None:
        super().__init__(layout, "int8-static")
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        self._remember_input_qparams()

    @classmethod
    def from_float(cls, conv: nn.Module, input_qparams: QParams) -> Self:  # type: ignore[override]
        if input_qparams.spec != STATIC_ACTIVATION:
            raise ValueError(f"static activations need spec {STATIC_ACTIVATION}, got {input_qparams.spec}")
        module = cls(ConvLayout.of(conv))
        module._set_weight(conv)
        module.input_scale.copy_(input_qparams.scale)
        module.input_zero_point.copy_(input_qparams.zero_point)
        module._remember_input_qparams()
        return module

    forward = QuantizedConv.forward  # calibrated scalars: traced by torch.compile into one graph

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._remember_input_qparams()

    def _remember_input_qparams(self) -> None:
        """Keep the calibrated ``(s_x, uint8 zero point)`` as Python numbers beside their buffers:
        no call reads them back from a tensor, so ``torch.compile`` traces one graph."""
        self._input_qparams = (float(self.input_scale), int(self.input_zero_point) + 128)

    def convolve(self, x: Tensor) -> Tensor:
        return self._int8_convolve(x.to(torch.float32), *self._input_qparams)
