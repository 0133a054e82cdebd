"""Quantized convolutions in an ONNX file (``format="onnx"``), for ONNX Runtime.

Each quantized ``Conv1d`` / ``Conv2d`` is written as the operators below (opset 21; strides,
padding, dilation and groups as the layer has them; uneven or non-zero padding runs first as
``Pad``, as mixprec runs it):

=============  ========================================================================
mixprec        ONNX
=============  ========================================================================
int8           ``u, s_x, z_x = DynamicQuantizeLinear(x)`` (uint8 per tensor: the range of
               the whole input, widened to hold 0; mixprec's rule), the exact accumulator
               (below), ``(float(acc) * s_x) * w_scale + b``, ``Relu`` when mixprec fused
               one: mixprec's arithmetic, step for step
int8-static    ``u = QuantizeLinear(x, s_x, z_x)`` with the calibrated scalars (saturating),
               then as ``int8``
w8             ``Conv(x, DequantizeLinear(W, w_scale, axis=0), b)``: the weight
               ``code * scale`` in float32, exactly as mixprec expands it
w4, w4gN       ``DequantizeLinear`` of int4 codes ``[out, window]`` (two per byte in the
               file) with the float32 widening of the fp16 group scales, ``axis=1``,
               ``block_size`` N (the window for ``w4``), reshaped to the weight, ``Conv``:
               again mixprec's float32 weight exactly
fp16           traced as mixprec runs it: ``Cast<float16>``, a float16 ``Conv``, ``Cast<float>``
=============  ========================================================================

The accumulator ``acc = sum (u - z_x) * w`` is exact either way it is written: as a float32
``Conv`` of ``float(u) - z_x`` with the codes widened by ``DequantizeLinear`` (scale 1), when
:func:`accumulator_bound` of the layer is below 2**24 (every partial sum is then an integer
float32 holds; ONNX Runtime runs its fast float convolution), else as ``ConvInteger(u, W, z_x)``
(pads hold ``z_x``, the code of 0), which ONNX Runtime's CPU provider runs about 15x slower
than its float ``Conv`` (measured on ResNet-8 at batch 64).

The file holds the int8 codes (and fp16 weights) as they are stored. Where mixprec's int8
convolutions differ: a sample holding NaN or +-inf makes mixprec's output NaN for that sample
and sets the range from the finite values; ONNX Runtime's ``DynamicQuantizeLinear`` follows its
own rules there. ``bf16`` convolutions are refused (ONNX Runtime's CPU provider has no bfloat16
``Conv``; use ``fp16``). The TorchScript exporter has no int4 type: the int4 codes are traced as
an int8 initializer named ``...w4_codes`` and rewritten as ONNX ``INT4`` after the export
(:func:`pack_int4_initializers`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mixprec.errors import ExportError
from mixprec.export.onnx_ops import absent, constant, rescale
from mixprec.formats import unpack_int4
from mixprec.nn import Int8Conv, Int8StaticConv, QuantizedConv, W4Conv, W8Conv

#: Every integer of magnitude up to 2**24 is a float32, so a float32 convolution of integer codes
#: whose partial sums stay below it computes the int32 accumulator exactly (in any order).
FLOAT32_EXACT_INTEGERS = 2**24

#: Convolution precisions the ONNX writer holds.
HELD = ("fp32", "fp16", "int8", "int8-static", "w8", "w4")

#: Suffix of the int8 initializers rewritten as INT4 after the export.
INT4_SUFFIX = ".w4_codes"


def nearest_conv(precision: str) -> str | None:
    """None when the ONNX writer holds a convolution in ``precision``, else the nearest it holds."""
    if precision in HELD or (precision.startswith("w4g") and precision[3:].isdigit()):
        return None
    if precision == "bf16":
        return "fp16 (ONNX Runtime's CPU provider has no bfloat16 Conv)"
    return "int8"


def accumulator_bound(codes: Tensor) -> int:
    """The largest ``|acc|`` any input can give: ``255 * sum |w|`` over an output channel's window
    (activation codes less their zero point lie in [-255, 255])."""
    return 255 * int(codes.to(torch.int64).abs().flatten(1).sum(1).max())


def _conv_attributes(layout: object) -> dict[str, object]:
    """ONNX ``Conv`` / ``ConvInteger`` attributes of a mixprec :class:`ConvLayout` (its zero padding
    on both sides of each spatial dimension)."""
    return {"strides_i": list(layout.stride), "pads_i": list(layout.conv_padding) * 2,
            "dilations_i": list(layout.dilation), "group_i": layout.groups}


def _placeholder(x: Tensor, layout: object) -> Tensor:
    """What a stand-in returns while it is traced: a tensor of the output's shape (the values are
    never used; the file gets the operators its ``symbolic`` emits)."""
    return layout.float_conv(x, x.new_zeros(layout.weight_shape), None)


class _Int8ConvOp(torch.autograd.Function):
    """``x_scale`` / ``zero_point`` None: dynamic activations."""

    @staticmethod
    def forward(ctx: object, x: Tensor, codes: Tensor, weight_scale: Tensor, bias: Tensor | None,  # noqa: ARG004
                x_scale: Tensor | None, zero_point: Tensor | None, layout: object, relu: bool,
                exact_in_float32: bool) -> Tensor:
        return _placeholder(x, layout)

    @staticmethod
    def symbolic(g: object, x: object, codes: object, weight_scale: object, bias: object, x_scale: object,
                 zero_point: object, layout: object, relu: bool, exact_in_float32: bool) -> object:
        if absent(x_scale):
            unsigned, x_scale, zero_point = g.op("DynamicQuantizeLinear", x, outputs=3)
        else:
            unsigned = g.op("QuantizeLinear", x, x_scale, zero_point)
        if exact_in_float32:
            centred = g.op("Sub", g.op("Cast", unsigned, to_i=1), g.op("Cast", zero_point, to_i=1))
            weight = g.op("DequantizeLinear", codes, constant(g, 1.0))
            acc = g.op("Conv", centred, weight, **_conv_attributes(layout))
        else:
            acc = g.op("ConvInteger", unsigned, codes, zero_point, **_conv_attributes(layout))
        y = rescale(g, acc, x_scale, weight_scale, bias)
        return g.op("Relu", y) if relu else y


class _W8ConvOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor, codes: Tensor, weight_scale: Tensor, bias: Tensor | None,  # noqa: ARG004
                layout: object) -> Tensor:
        return _placeholder(x, layout)

    @staticmethod
    def symbolic(g: object, x: object, codes: object, weight_scale: object, bias: object, layout: object) -> object:
        weight = g.op("DequantizeLinear", codes, weight_scale, axis_i=0)
        inputs = (x, weight) if absent(bias) else (x, weight, bias)
        return g.op("Conv", *inputs, **_conv_attributes(layout))


class _W4ConvOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None,  # noqa: ARG004
                layout: object, block: int) -> Tensor:
        return _placeholder(x, layout)

    @staticmethod
    def symbolic(g: object, x: object, codes: object, scales: object, bias: object, layout: object,
                 block: int) -> object:
        rows = g.op("DequantizeLinear", codes, scales, axis_i=1, block_size_i=block)
        shape = constant(g, list(layout.weight_shape), torch.int64)
        weight = g.op("Reshape", rows, shape)
        inputs = (x, weight) if absent(bias) else (x, weight, bias)
        return g.op("Conv", *inputs, **_conv_attributes(layout))


def pack_int4_initializers(path: Path) -> int:
    """Rewrite the ONNX file's int8 initializers named ``...w4_codes`` (values in [-7, 7]) as
    ``INT4`` tensors (two's complement nibbles, the first value of each pair in the low nibble);
    returns how many were rewritten."""
    import numpy as np
    import onnx

    model = onnx.load(str(path))
    count = 0
    for index, tensor in enumerate(model.graph.initializer):
        if not tensor.name.endswith(INT4_SUFFIX):
            continue
        values = onnx.numpy_helper.to_array(tensor).reshape(-1).astype(np.uint8) & 0x0F
        if values.size % 2:
            values = np.append(values, np.uint8(0))
        packed = (values[0::2] | (values[1::2] << 4)).astype(np.uint8)
        model.graph.initializer[index].CopyFrom(
            onnx.helper.make_tensor(tensor.name, onnx.TensorProto.INT4, list(tensor.dims), packed.tobytes(), raw=True))
        count += 1
    onnx.save(model, str(path))
    return count


class OnnxConv(nn.Module):
    """Stands in for an ``int8`` / ``int8-static`` / ``w8`` / ``w4`` convolution while it is traced: holds
    the tensors in the ONNX layout as buffers (they become the file's initializers) and emits the
    operators of the module docstring."""

    def __init__(self, module: QuantizedConv) -> None:
        super().__init__()
        if not isinstance(module, (W4Conv, W8Conv, Int8Conv)):
            raise ExportError(f"ONNX export cannot hold a {module.precision} convolution ({type(module).__name__})")
        self.layout = module.layout
        self.kind = "w4" if isinstance(module, W4Conv) else "w8" if isinstance(module, W8Conv) else "int8"
        # int8's rescale multiplies [N, C, *spatial] outputs: its scales and bias broadcast over channels
        shape = (1, -1) + (1,) * self.layout.dims if self.kind == "int8" else (-1,)
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().reshape(shape).clone())
        if self.kind == "w4":
            self.block = module.group_size
            codes = unpack_int4(module.weight_packed, signed=True)[: self.layout.out_channels * self.layout.window]
            self.register_buffer("w4_codes", codes.reshape(self.layout.out_channels, -1).clone())
            self.register_buffer("scales", module.weight_scale.to(torch.float32).clone())  # fp16 widened exactly
            return
        self.register_buffer("codes", module.weight_codes().detach().clone())
        self.register_buffer("weight_scale", module.weight_scale.detach().to(torch.float32).reshape(shape).clone())
        if self.kind == "w8":
            return
        self.relu = module.fused_relu is not None
        self.exact_in_float32 = accumulator_bound(self.codes) < FLOAT32_EXACT_INTEGERS
        if isinstance(module, Int8StaticConv):
            # the calibrated scale and the uint8 zero point (the stored int8 one + 128)
            self.register_buffer("x_scale", module.input_scale.detach().to(torch.float32).reshape(()).clone())
            self.register_buffer("zero_point", (module.input_zero_point.reshape(()) + 128).to(torch.uint8))
        else:
            self.x_scale = self.zero_point = None

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == self.layout.dims + 1
        batch = self.layout.as_batch(x)
        if self.kind == "w4":
            y = _W4ConvOp.apply(batch, self.w4_codes, self.scales, self.bias, self.layout, self.block)
        elif self.kind == "w8":
            y = _W8ConvOp.apply(batch, self.codes, self.weight_scale, self.bias, self.layout)
        else:
            y = _Int8ConvOp.apply(batch, self.codes, self.weight_scale, self.bias, self.x_scale, self.zero_point,
                                  self.layout, self.relu, self.exact_in_float32)
        return y.squeeze(0) if unbatched else y
