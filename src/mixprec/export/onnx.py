"""``format="onnx"``: MLPs, CNNs and BERT-style encoders for ONNX Runtime.

The model is traced with PyTorch's TorchScript ONNX exporter; each quantized Linear is
written as the operators below (opset 21, plus ``com.microsoft`` for ``MatMulNBits``):

=============  ========================================================================
mixprec        ONNX
=============  ========================================================================
int8           per row of ``x``: ``s = max(ReduceMax(|x|), 127 * 2**-126) / 127``,
               ``u = QuantizeLinear(x, s, 128)`` (``round_half_even(x / s) + 128``),
               ``MatMulIntegerToFloat(u, W^T, 1, 1, zero point 128)`` (the exact
               ``float(q . w)``), ``(acc * s) * w_scale + b``: mixprec's arithmetic
int8-asym      ``u, s_x, z_x = DynamicQuantizeLinear(x)``, ``MatMulInteger(u, W^T, z_x)``,
               ``Cast<float>(acc) * (s_x * w_scale) + b``: ONNX Runtime's own dynamic
               quantization, which it fuses into one ``DynamicQuantizeMatMul``
int8-static    ``q = Clip(Round(x / s_x) + z_x, -128, 127)``, the same ``MatMulInteger``,
               ``float(acc) * (s_x * w_scale) + b'`` (b' with the zero point folded in)
w8             ``MatMul(x, DequantizeLinear(W^T, 1)) * w_scale + b`` (the int8 codes as floats)
w4gN, w8gN     ``MatMulNBits`` (bits 4 / 8, block N, float32 activations: accuracy_level 0)
w4a8gN         ``x`` rounded per row as for int8 (``QuantizeLinear``, ``DequantizeLinear``:
               ``code * s``), then ``MatMulNBits`` accuracy_level 0: mixprec's arithmetic
               up to float32 summation order (accuracy_level 4 would round ``x`` again,
               per block, ONNX Runtime's way)
fp16           ``Cast<float16>``, float16 ``MatMul`` + bias, ``Cast<float>``
=============  ========================================================================

``MatMulNBits`` needs N a power of two >= 16; its codes are mixprec's plus the format's
zero point (8 or 128), its scales mixprec's fp16 scales widened exactly. Embeddings
(fp16, bf16, int8, w4) and everything that is not a Linear are traced as mixprec runs them.
``bf16`` Linears are refused: ONNX Runtime's CPU provider has no bfloat16 MatMul. Quantized
convolutions: :mod:`mixprec.export.onnx_conv`.

Inputs: a transformers encoder (``config`` and ``input_ids``) gets ``input_ids``,
``attention_mask`` (and ``token_type_ids`` when its config has token types) and returns
``last_hidden_state``, batch and sequence dynamic; any other module needs
``example=`` (a tensor) and gets one input ``input`` and one output ``output``, batch dynamic.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from mixprec.errors import ExportError
from mixprec.export.onnx_conv import OnnxConv, nearest_conv, pack_int4_initializers
from mixprec.export.onnx_ops import constant
from mixprec.export.registry import ExportFormat, register
from mixprec.formats import SCALE_MIN, pack_int4, unpack_int4
from mixprec.nn import (
    HalfConv,
    HalfLinear,
    Int8AsymLinear,
    Int8DynamicLinear,
    Int8StaticLinear,
    QuantizedConv,
    QuantizedModule,
    W4A8Linear,
    W4Conv,
    W4Linear,
    W8GroupLinear,
    W8Linear,
)

OPSET = 21
_POWER_OF_TWO_BLOCKS = {16, 32, 64, 128, 256, 512, 1024, 2048}


def nearest(kind: str, precision: str) -> str | None:
    """None when the ONNX writer holds ``precision`` for ``kind``, else the nearest held one."""
    if kind == "conv":
        return nearest_conv(precision)
    if kind == "embedding":
        return None if precision in ("fp32", "fp16", "bf16", "int8") or precision.startswith("w4") else "int8"
    if precision in ("fp32", "fp16", "int8", "int8-static", "int8-asym", "w8"):
        return None
    if precision == "bf16":
        return "fp16 (ONNX Runtime's CPU provider has no bfloat16 MatMul)"
    for family in ("w4a8g", "w4g", "w8g"):
        if precision.startswith(family):
            block = int(precision[len(family):])
            return None if block in _POWER_OF_TWO_BLOCKS else f"{family}32 or {family}64 (MatMulNBits blocks)"
    return "int8"


def _int8_matmul(g: object, codes: object, weight_t: object) -> object:
    """The exact int32 product of int8 codes (held as floats in [-128, 127]) with ``W^T``: the
    codes go in as ``uint8 = code + 128`` with zero point 128, ONNX Runtime's fast u8 x s8 path
    (about 9x its s8 x s8 one here), which subtracts the zero point exactly."""
    unsigned = g.op("Cast", g.op("Add", codes, constant(g, 128.0)), to_i=2)  # uint8
    return g.op("MatMulInteger", unsigned, weight_t, constant(g, 128, torch.uint8))


def _per_row_codes(g: object, rows: object) -> tuple[object, object, object]:
    """mixprec's dynamic int8 rounding of ``rows`` ``[M, K]``: ``s = max(max|x|, 127 * 2**-126) / 127``
    per row and ``u = QuantizeLinear(x, s, 128) = round_half_even(x / s) + 128`` (never saturating);
    returns ``u`` (uint8), ``s`` ``[M]`` and the zero points ``[M]``."""
    amax = g.op("ReduceMax", g.op("Abs", rows), constant(g, [1], torch.int64), keepdims_i=0)
    row_scale = g.op("Div", g.op("Max", amax, constant(g, 127.0 * SCALE_MIN)), constant(g, 127.0))
    zero_point = g.op("Expand", constant(g, 128, torch.uint8), g.op("Shape", row_scale))
    return g.op("QuantizeLinear", rows, row_scale, zero_point, axis_i=0), row_scale, zero_point


class _ScaledLinear(torch.autograd.Function):
    """``(x, W^T [K, N], per-column scale, bias)``: traced for its symbolic only (the value
    it returns while tracing is a placeholder of the output's shape)."""

    @staticmethod
    def forward(ctx: object, x: Tensor, weight_t: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG004
        return x.new_empty(*x.shape[:-1], weight_t.shape[1])


class _Int8Dynamic(_ScaledLinear):
    @staticmethod
    def symbolic(g: object, x: object, weight_t: object, scale: object, bias: object) -> object:
        in_features, out_features = weight_t.type().sizes()
        rows = g.op("Reshape", x, constant(g, [-1, in_features], torch.int64))
        unsigned, row_scale, zero_point = _per_row_codes(g, rows)
        one = constant(g, 1.0)  # float(acc) * (1 * 1): exact, in the same kernel as the int8 GEMM
        acc = g.op("com.microsoft::MatMulIntegerToFloat", unsigned, weight_t, one, one,
                   constant(g, 128, torch.uint8))
        y = g.op("Mul", g.op("Mul", acc, g.op("Unsqueeze", row_scale, constant(g, [1], torch.int64))), scale)
        y = y if bias is None else g.op("Add", y, bias)
        shape = g.op("Concat", g.op("Shape", x, end_i=-1), constant(g, [out_features], torch.int64), axis_i=0)
        return g.op("Reshape", y, shape)


class _Int8Asym(_ScaledLinear):
    @staticmethod
    def symbolic(g: object, x: object, weight_t: object, scale: object, bias: object) -> object:
        unsigned, x_scale, zero_point = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", unsigned, weight_t, zero_point)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", x_scale, scale))
        return y if bias is None else g.op("Add", y, bias)


class _Int8Static(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor, weight_t: Tensor, input_scale: Tensor, zero_point: Tensor,  # noqa: ARG004
                combined: Tensor, bias: Tensor) -> Tensor:
        return x.new_empty(*x.shape[:-1], weight_t.shape[1])

    @staticmethod
    def symbolic(g: object, x: object, weight_t: object, input_scale: object, zero_point: object, combined: object,
                 bias: object) -> object:
        shifted = g.op("Add", g.op("Round", g.op("Div", x, input_scale)), zero_point)
        acc = _int8_matmul(g, g.op("Clip", shifted, constant(g, -128.0), constant(g, 127.0)), weight_t)
        return g.op("Add", g.op("Mul", g.op("Cast", acc, to_i=1), combined), bias)


class _W8(_ScaledLinear):
    @staticmethod
    def symbolic(g: object, x: object, weight_t: object, scale: object, bias: object) -> object:
        # DequantizeLinear with scale 1 is the exact float of each code, like Cast; unlike Cast,
        # the exporter's constant folding leaves it alone, so the file keeps the int8 codes
        codes = g.op("DequantizeLinear", weight_t, constant(g, 1.0))
        y = g.op("Mul", g.op("MatMul", x, codes), scale)
        return y if bias is None else g.op("Add", y, bias)


class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None,  # noqa: ARG004
                bits: int, block: int, per_token_int8: bool, out_features: int) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @staticmethod
    def symbolic(g: object, x: object, blocks: object, scales: object, bias: object, bits: int, block: int,
                 per_token_int8: bool, out_features: int) -> object:
        in_features = blocks.type().sizes()[1] * block
        if per_token_int8:
            rows = g.op("Reshape", x, constant(g, [-1, in_features], torch.int64))
            unsigned, row_scale, zero_point = _per_row_codes(g, rows)
            x = g.op("Reshape", g.op("DequantizeLinear", unsigned, row_scale, zero_point, axis_i=0), g.op("Shape", x))
        y = g.op("com.microsoft::MatMulNBits", x, blocks, scales, K_i=in_features, N_i=out_features, bits_i=bits,
                 block_size_i=block, accuracy_level_i=0)
        return y if bias is None else g.op("Add", y, bias)


class _OnnxLinear(nn.Module):
    """Stands in for a quantized Linear while it is traced: holds the tensors in the ONNX
    layout as buffers (they become the file's initializers) and emits the operators above."""

    def __init__(self, module: QuantizedModule) -> None:
        super().__init__()
        self.kind = type(module)
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if isinstance(module, W4Linear):
            codes = unpack_int4(module.weight_packed, signed=True)
            self._nbits(codes, module.weight_scale, 4, module.group_size, isinstance(module, W4A8Linear))
        elif isinstance(module, W8GroupLinear):
            self._nbits(module.weight, module.weight_scale, 8, module.group_size, False)
        elif isinstance(module, Int8StaticLinear):
            self.register_buffer("weight_t", module.weight_codes().t().contiguous())
            self.register_buffer("input_scale", module.input_scale.reshape(()).clone())
            self.register_buffer("zero_point", module.input_zero_point.to(torch.float32).reshape(()))
            self.register_buffer("combined", (module.input_scale * module.weight_scale).reshape(-1))
        elif isinstance(module, (Int8DynamicLinear, Int8AsymLinear, W8Linear)):
            self.register_buffer("weight_t", module.weight_codes().t().contiguous())
            self.register_buffer("scale", module.weight_scale.reshape(-1).clone())
        else:
            raise ExportError(f"ONNX export cannot hold a {module.precision} layer ({type(module).__name__})")

    def _nbits(self, codes: Tensor, scale: Tensor, bits: int, block: int, per_token_int8: bool) -> None:
        """MatMulNBits storage: ``[N, K / block, block * bits / 8]`` bytes of ``u = code + 2**(bits-1)``
        (for 4 bits, element ``2i`` in the low nibble of byte ``i``), float32 scales ``[N * K / block]``."""
        rows, columns = codes.shape
        unsigned = (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        if bits == 4:
            unsigned = pack_int4(unsigned)  # mixprec's own nibble order is MatMulNBits
        self.register_buffer("blocks", unsigned.reshape(rows, columns // block, -1).contiguous())
        self.register_buffer("scales", scale.to(torch.float32).reshape(-1).clone())
        self.bits, self.block, self.per_token_int8, self.out_features = bits, block, per_token_int8, rows

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "blocks"):
            return _MatMulNBits.apply(x, self.blocks, self.scales, self.bias, self.bits, self.block,
                                      self.per_token_int8, self.out_features)
        if issubclass(self.kind, Int8StaticLinear):
            return _Int8Static.apply(x, self.weight_t, self.input_scale, self.zero_point, self.combined, self.bias)
        if issubclass(self.kind, W8Linear):
            return _W8.apply(x, self.weight_t, self.scale, self.bias)
        if issubclass(self.kind, Int8AsymLinear):
            return _Int8Asym.apply(x, self.weight_t, self.scale, self.bias)
        return _Int8Dynamic.apply(x, self.weight_t, self.scale, self.bias)


@contextlib.contextmanager
def _stand_ins(model: nn.Module) -> Iterator[None]:
    """Swap every quantized Linear and convolution (not the half ones, which trace as they run)
    for its ONNX stand-in, and put the originals back afterwards."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedModule) and not hasattr(module, "num_embeddings") \
                and not isinstance(module, (HalfLinear, HalfConv)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, OnnxConv(module) if isinstance(module, QuantizedConv) else _OnnxLinear(module))
            swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


class _EncoderOutputs(nn.Module):
    """A transformers encoder called with keyword inputs, returning ``last_hidden_state``."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def _traced_call(model: nn.Module, example: object) -> tuple[nn.Module, tuple[Tensor, ...], list[str], list[str],
                                                             dict[str, dict[int, str]]]:
    config = getattr(model, "config", None)
    if config is not None and "input_ids" in inspect.signature(model.forward).parameters:
        if example is not None:
            raise ExportError("a transformers encoder is traced with its own example tokens; drop example=")
        names = ("input_ids", "attention_mask") + (("token_type_ids",)
                                                   if getattr(config, "type_vocab_size", 0) > 1 else ())
        ids = torch.ones(2, 8, dtype=torch.int64)
        inputs = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if len(names) == 3 else ())
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        return _EncoderOutputs(model, names), inputs, list(names), ["last_hidden_state"], axes
    if not isinstance(example, Tensor):
        raise ExportError(f"ONNX export of a {type(model).__name__} needs example=<an input tensor> to trace it "
                          f"(got {type(example).__name__}); transformers encoders need none")
    return model, (example,), ["input"], ["output"], {"input": {0: "batch"}, "output": {0: "batch"}}


def write_onnx(model: nn.Module, path: Path, options: dict) -> None:
    """Trace ``model`` (as mixprec quantized it) into one ONNX file at ``path``.
    Option ``example``: an input tensor, for models that are not transformers encoders."""
    traced, inputs, input_names, output_names, axes = _traced_call(model, options.get("example"))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with _stand_ins(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-side checks and the legacy exporter
            torch.onnx.export(traced, inputs, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, opset_version=OPSET,
                              custom_opsets={"com.microsoft": 1}, do_constant_folding=True)
    finally:
        for module, training in modes.items():
            module.training = training
    int4_layers = sum(isinstance(module, W4Conv) for module in model.modules())
    if int4_layers and pack_int4_initializers(path) != int4_layers:
        raise ExportError(f"found the int4 codes of fewer than the {int4_layers} w4 convolutions in the traced file")


ONNX = register(ExportFormat(
    name="onnx",
    description="ONNX Runtime: one .onnx file (MLPs, CNNs and BERT-style encoders)",
    nearest=nearest,
    kinds=("linear", "embedding", "conv"),
    write=write_onnx,
    options=("example",),
))
