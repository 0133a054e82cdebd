"""int8 linear layers: dynamic per-token, dynamic and static per-tensor, and the seed's fake-quant baseline.

Weights are int8 in the ``[out, in]`` layout of ``nn.Linear``. Bias stays float32 since it
is added after the int32 accumulator is rescaled to float.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.formats import QuantSpec, dequantize, qparams_from_tensor, quantize
from mixprec.formats.affine import QParams
from mixprec.kernels import (
    INT8_MATMUL_KERNEL,
    MAX_REDUCTION,
    int8_linear_dynamic,
    int8_linear_packed,
    int8_linear_static,
    int8_linear_static_packed,
    int8_matmul,
    native,
    onednn_int8,
    quantize_static,
    rescale_accumulator,
)
from mixprec.kernels.activation_quant import (
    ACTIVATION_PER_TENSOR,
    dynamic_tensor_qparams,
    dynamic_tensor_qparams_torch,
    offset_codes,
    quantize_static_tensors,
    rescale_accumulator_,
)
from mixprec.kernels.cpu import native_slow_path
from mixprec.kernels.huge_pages import zeros_in_huge_pages
from mixprec.kernels.int8_conv import MAX_CONV_REDUCTION
from mixprec.kernels.int8_linear import PACKED_ROWS_MAX, dense_rows_note
from mixprec.kernels.onednn_int8 import KERNEL_NAME as ONEDNN_KERNEL
from mixprec.kernels.weight_only import KERNEL_NAME as W8_KERNEL
from mixprec.kernels.weight_only import w8_linear
from mixprec.nn.base import (
    PackedWeightMixin,
    QuantizedModule,
    as_float32_matrix,
    check_linear_input,
    restore_shape,
    round_weight,
)

#: int8 weights, symmetric [-127, 127], one scale per output channel.
WEIGHT_PER_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0)
#: int8 weights or activations, symmetric [-127, 127], one scale for the tensor.
PER_TENSOR_SYMMETRIC = QuantSpec(bits=8, signed=True, symmetric=True, granularity="tensor")
#: Static activations: asymmetric int8 [-128, 127], one scale and zero point.
STATIC_ACTIVATION = ACTIVATION_PER_TENSOR


class _Int8WeightLinear(QuantizedModule):
    """Holds int8 weight codes, their float32 scales, and an optional float32 bias."""

    weight_spec: QuantSpec = WEIGHT_PER_CHANNEL

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        if in_features > MAX_REDUCTION:
            raise ValueError(f"in_features {in_features} exceeds {MAX_REDUCTION}, the longest int8 reduction "
                             "whose int32 accumulator cannot overflow")
        self.in_features, self.out_features = in_features, out_features
        nscales = out_features if self.weight_spec.granularity == "channel" else 1
        self.register_buffer("weight", zeros_in_huge_pages((out_features, in_features), torch.int8))
        self.register_buffer("weight_scale", torch.ones(nscales))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, hessian: Tensor | None = None) -> Self:
        """Quantize ``linear``'s weight with :attr:`weight_spec` (GPTQ if ``hessian`` is
        given, else round to nearest); copy its bias."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module._set_weight(linear, hessian)
        return module

    def _set_weight(self, linear: nn.Linear, hessian: Tensor | None) -> None:
        codes, qp = round_weight(linear.weight, self.weight_spec, hessian)
        self._store_codes(codes)
        self.weight_scale.copy_(qp.scale.reshape(-1))
        if self.bias is not None:
            self.bias.copy_(linear.bias.detach())

    def _store_codes(self, codes: Tensor) -> None:
        self.weight.copy_(codes)

    def weight_codes(self) -> Tensor:
        """The int8 weight codes, ``[out, in]``."""
        return self.weight

    def dequantized_weight(self) -> Tensor:
        return self.weight_codes().to(torch.float32) * self.weight_scale.reshape(-1, 1)

    def weight_qparams(self) -> QParams:
        scale = self.weight_scale if self.weight_spec.granularity == "channel" else self.weight_scale[0]
        return QParams(self.weight_spec, scale.clone(), torch.zeros_like(scale, dtype=torch.int32))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, precision={self.precision}"


class Int8DynamicLinear(_Int8WeightLinear):
    """``int8``: per-token symmetric int8 activations, int8 x int8 GEMM, int32 accumulation.

    ``y[m, n] = acc[m, n] * s_x[m] * s_w[n] + b[n]`` evaluated in float32 left to right,
    where ``acc`` is the exact int32 dot product of the codes. A token holding NaN or
    +-inf gives an all-NaN output row.
    """

    precision = "int8"

    @property
    def kernel(self) -> str:  # type: ignore[override]
        fused = "one fused C++ call" if native.available() else "PyTorch ops"
        return f"{INT8_MATMUL_KERNEL}; per-token quantization and rescale in {fused}{dense_rows_note(self.weight)}"

    @property
    def slow_path(self) -> str | None:
        return native_slow_path() or onednn_int8.slow_path(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        y = int8_linear_dynamic(as_float32_matrix(x), self.weight, self.weight_scale, self.bias)
        return restore_shape(y, x)


class _OneDnnPackedWeight(PackedWeightMixin):
    """For int8 linears holding their weight only in oneDNN's prepacked layout (no dense copy):
    ``state_dict()`` unpacks it to the ordinary dense int8 ``[out, in]`` tensor, so checkpoints do not depend
    on the layout, and loading packs it again. Bytes are counted as the dense size (oneDNN may pad its blocks).
    Goes before the int8 linear class it packs (whose ``__init__`` registers the dense ``weight``)."""

    in_features: int
    out_features: int
    #: How the activations are quantized, for the kernel name.
    activation_steps: str

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)  # type: ignore[call-arg]
        self._store_codes(self._buffers.pop("weight"))  # type: ignore[attr-defined]
        self._unit_scale = torch.ones(out_features)
        self._zero_points = torch.zeros(out_features, dtype=torch.int32)

    @property
    def dense_weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _store_codes(self, codes: Tensor) -> None:
        self._packed = onednn_int8.prepack(codes)
        self._rows_in_place = onednn_int8.reads_in_place(codes, self._packed)

    def weight_codes(self) -> Tensor:
        return onednn_int8.unpack(self._packed)

    def onednn_operands(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """The packed weight, the unit scales and zero points oneDNN's call takes, and whether up to
        :data:`~mixprec.kernels.int8_linear.PACKED_ROWS_MAX` rows read the packed bytes in place."""
        return self._packed, self._unit_scale, self._zero_points, self._rows_in_place

    @property
    def kernel(self) -> str:
        fused = "fused C++" if native.available() else "PyTorch-op"
        rows = (f"; up to {PACKED_ROWS_MAX} rows: {onednn_int8.IN_PLACE_ROWS_KERNEL_NAME}"
                if self._rows_in_place else "")
        return f"{ONEDNN_KERNEL}; {fused} {self.activation_steps} and rescale{rows}"

    @property
    def slow_path(self) -> str | None:
        if reason := super().slow_path:  # type: ignore[misc]
            return reason
        if native.int8_packed_rows_available() and not self._rows_in_place:
            return ("oneDNN packed this weight in a layout mixprec's few-row kernel does not read (another oneDNN "
                    "version?); decoding (1-4 rows) runs oneDNN's GEMM, about 1.3-1.5x slower from DRAM")
        return None


class Int8PackedLinear(_OneDnnPackedWeight, Int8DynamicLinear):
    """``int8`` holding its weight only in oneDNN's prepacked layout (no dense copy).

    Same arithmetic, same bits as :class:`Int8DynamicLinear`; the GEMM runs in oneDNN's
    u8 x s8 kernel (VNNI/AMX). See :class:`_OneDnnPackedWeight` for checkpoints and bytes.
    """

    activation_steps = "per-token quantization"

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        y = int8_linear_packed(as_float32_matrix(x), self._packed, self._unit_scale, self._zero_points,
                               self.weight_scale, self.bias, self._rows_in_place)
        return restore_shape(y, x)


def int8_dynamic_class(in_features: int, out_features: int) -> type[Int8DynamicLinear]:
    """The ``int8`` module for a shape: oneDNN-packed where that kernel is faster here."""
    return Int8PackedLinear if onednn_int8.prefer_packed(out_features, in_features) else Int8DynamicLinear


class Int8StaticLinear(_Int8WeightLinear):
    """``int8-static``: activations quantized with calibrated per-tensor asymmetric parameters.

    ``q_x = clamp(round_half_even(x / s_x) + z_x, -128, 127)`` with ``s_x, z_x`` fixed at
    calibration; ``y[m, n] = ((acc[m, n] * 1) * (s_x * s_w[n])) + b'[n]`` where the
    zero-point term is folded into the stored bias
    ``b'[n] = b[n] - s_x * s_w[n] * z_x * sum_k W_q[n, k]``. Inputs beyond the calibrated
    range, +-inf included, saturate; a token holding NaN gives an all-NaN output row.
    """

    precision = "int8-static"

    @property
    def kernel(self) -> str:  # type: ignore[override]
        fused = "fused C++" if native.available() else "PyTorch-op"
        return f"{INT8_MATMUL_KERNEL}; {fused} static quantization and rescale{dense_rows_note(self.weight)}"

    @property
    def slow_path(self) -> str | None:
        return native_slow_path()

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))

    @classmethod
    def from_float(cls, linear: nn.Linear, input_qparams: QParams,  # type: ignore[override]
                   hessian: Tensor | None = None) -> Self:
        if input_qparams.spec != STATIC_ACTIVATION:
            raise ValueError(f"static activations need spec {STATIC_ACTIVATION}, got {input_qparams.spec}")
        module = cls(linear.in_features, linear.out_features, bias=True)
        module._set_weight(linear, hessian)
        module.input_scale.copy_(input_qparams.scale)
        module.input_zero_point.copy_(input_qparams.zero_point)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
        row_sums = module.weight_codes().to(torch.int32).sum(dim=1).to(torch.float32)
        combined = module.input_scale * module.weight_scale
        module.bias.copy_(bias - combined * module.input_zero_point.to(torch.float32) * row_sums)
        return module

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        # the 0-dim buffers passed as tensors: nothing read back into Python, one graph under torch.compile
        y = int8_linear_static(as_float32_matrix(x), self.input_scale, self.input_zero_point, self.weight,
                               self.input_scale * self.weight_scale, self.bias)
        return restore_shape(y, x)


class Int8StaticPackedLinear(_OneDnnPackedWeight, Int8StaticLinear):
    """``int8-static`` holding its weight only in oneDNN's prepacked layout (no dense copy), for the
    weights where oneDNN's GEMM is faster here (:func:`int8_static_class`). Same arithmetic, same bits as
    :class:`Int8StaticLinear`: the calibrated codes + 128 go to oneDNN's u8 x s8 kernel (zero point 128, the
    exact int32 sums), up to 4 rows to mixprec's kernel reading the packed bytes in place."""

    activation_steps = "static quantization"

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        y = int8_linear_static_packed(as_float32_matrix(x), self.input_scale, self.input_zero_point, self._packed,
                                      self._unit_scale, self._zero_points, self.input_scale * self.weight_scale,
                                      self.bias, self._rows_in_place)
        return restore_shape(y, x)


def int8_static_class(in_features: int, out_features: int) -> type[Int8StaticLinear]:
    """The ``int8-static`` module for a shape: oneDNN-packed where that kernel is faster here."""
    return Int8StaticPackedLinear if onednn_int8.prefer_packed(out_features, in_features) else Int8StaticLinear


class Int8AsymLinear(_Int8WeightLinear):
    """``int8-asym``: activations quantized at each call with one asymmetric scale and zero
    point for the whole input, the convention of ONNX Runtime's ``DynamicQuantizeLinear`` /
    ``quantize_dynamic`` and of PyTorch's dynamic quantization; int8 weights per channel.

    ``s_x, z_x`` cover ``[min(x), max(x)]`` widened to hold 0 (:func:`dynamic_tensor_qparams`);
    ``q = clamp(round_half_even(x / s_x) + z_x, -128, 127)`` (the uint8 code is ``q + 128``);
    ``acc[m, n] = sum_k (q - z_x) * w[n, k]``, exact in int32 for up to
    :data:`MAX_CONV_REDUCTION` input features; ``y = ((float(acc) * 1) * (s_x * s_w[n])) + b[n]``,
    each step rounded to float32 (the multiplier ``s_x * s_w[n]`` is what ONNX Runtime's
    ``MatMulIntegerToFloat`` forms). Coarser than ``int8``'s per-token scales where tokens
    differ in range, but it is the arithmetic ONNX Runtime runs in one fused kernel. Only
    finite inputs set the range; a token holding NaN or +-inf gives an all-NaN output row.
    """

    precision = "int8-asym"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        if in_features > MAX_CONV_REDUCTION:
            raise ValueError(f"in_features {in_features} exceeds {MAX_CONV_REDUCTION}, the longest uint8 x int8 "
                             "reduction whose int32 accumulator cannot overflow; use int8 or w8")
        super().__init__(in_features, out_features, bias)
        self._row_sums: tuple[int, Tensor] | None = None

    @property
    def kernel(self) -> str:  # type: ignore[override]
        fused = "fused C++" if native.available() else "PyTorch-op"
        return f"{INT8_MATMUL_KERNEL}; {fused} per-tensor quantization and rescale"

    @property
    def slow_path(self) -> str | None:
        return native_slow_path()

    def weight_row_sums(self) -> Tensor:
        """``sum_k w[n, k]`` as int32 ``[N]`` (for the zero point's term), cached per weight version. Under
        ``torch.compile`` the graph reads the sums cached when the codes were last stored, loaded or used eagerly
        (summing the whole weight in the graph on every call made compiled MiniLM slower than eager)."""
        if torch.compiler.is_compiling():
            return self._row_sums[1] if self._row_sums is not None else self.weight.sum(dim=1, dtype=torch.int32)
        version = self.weight._version
        if self._row_sums is None or self._row_sums[0] != version or self._row_sums[1].shape[0] != self.out_features:
            self._refresh_row_sums()
        return self._row_sums[1]

    def _refresh_row_sums(self) -> None:
        self._row_sums = (self.weight._version, self.weight.sum(dim=1, dtype=torch.int32))

    def _store_codes(self, codes: Tensor) -> None:
        super()._store_codes(codes)
        self._refresh_row_sums()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh_row_sums()

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        rows = as_float32_matrix(x)
        if torch.compiler.is_compiling():  # tensor qparams: no host sync, same bits
            scale, zero_point, rows = dynamic_tensor_qparams_torch(rows)
            q, row_flag = quantize_static_tensors(rows, scale, zero_point)
        else:
            scale, zero_point, rows = dynamic_tensor_qparams(rows)
            q, row_flag = quantize_static(rows, scale, zero_point)
        return restore_shape(self._product(q, row_flag, scale, zero_point), x)

    def _product(self, q: Tensor, row_flag: Tensor, scale: Tensor | float, zero_point: Tensor | int) -> Tensor:
        """``((acc * flag) * (s_w * s_x)) + b`` for this call's codes ``q``, ``acc = sum_k (q - z_x) * w`` exact."""
        acc = int8_matmul(q, self.weight.t()).sub_(self.weight_row_sums() * zero_point)  # exact: see above
        return rescale_accumulator(acc, row_flag, self.weight_scale * scale, self.bias)


class Int8AsymPackedLinear(_OneDnnPackedWeight, Int8AsymLinear):
    """``int8-asym`` holding its weight only in oneDNN's prepacked layout (no dense copy), for the weights where
    oneDNN's GEMM is faster here (:func:`int8_asym_class`). Same arithmetic, same bits as :class:`Int8AsymLinear`:
    oneDNN takes each call's zero point as its source zero point (no weight row sums needed), at every M."""

    activation_steps = "per-tensor quantization"

    def _refresh_row_sums(self) -> None:
        self._row_sums = None  # oneDNN subtracts the zero point's term itself

    @property
    def slow_path(self) -> str | None:  # no in-place few-row kernel here, so no layout to report
        return native_slow_path()

    @property
    def kernel(self) -> str:  # type: ignore[override]
        fused = "fused C++" if native.available() else "PyTorch-op"
        return f"{ONEDNN_KERNEL}, the call's zero point as oneDNN's source zero point; {fused} per-tensor " \
               "quantization and rescale"

    def _product(self, q: Tensor, row_flag: Tensor, scale: Tensor | float, zero_point: Tensor | int) -> Tensor:
        # q + 128 against oneDNN's source zero point z_x + 128: oneDNN forms the exact sum_k (q - z_x) * w itself
        acc = onednn_int8.matmul_u8_zp(offset_codes(q), self._packed, self._unit_scale, self._zero_points,
                                       zero_point + 128)
        return rescale_accumulator_(acc, row_flag, self.weight_scale * scale, self.bias)


def int8_asym_class(in_features: int, out_features: int) -> type[Int8AsymLinear]:
    """The ``int8-asym`` module for a shape: oneDNN-packed where that kernel is faster here."""
    return Int8AsymPackedLinear if onednn_int8.prefer_packed(out_features, in_features) else Int8AsymLinear


class Int8TensorFakeQuantLinear(_Int8WeightLinear):
    """``int8-tensor``: the seed project's scheme, kept as a baseline.

    Dynamic symmetric per-tensor quantization of activations and weights, then
    dequantize and run the matmul in float32 ("fake" quantization): memory shrinks, but
    nothing runs in int8 and it is slower than plain float32.
    """

    precision = "int8-tensor"
    kernel = "fake-quant: dequantize, float32 matmul"
    weight_spec = PER_TENSOR_SYMMETRIC

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        xf = x.to(torch.float32)
        x_qp = qparams_from_tensor(xf, PER_TENSOR_SYMMETRIC)
        x_fq = dequantize(quantize(xf, x_qp), x_qp)
        w = dequantize(self.weight, self.weight_qparams())
        return F.linear(x_fq, w, self.bias).to(x.dtype)


class W8Linear(_Int8WeightLinear):
    """``w8``: int8 weights (symmetric, per output channel), float32 activations.

    ``y = (x @ W_q^T) * s_w + b`` accumulated in float32; see
    :mod:`mixprec.kernels.weight_only` for the two paths and when each runs.
    """

    precision = "w8"
    kernel = W8_KERNEL

    @property
    def slow_path(self) -> str | None:
        return native_slow_path()

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        y = w8_linear(as_float32_matrix(x), self.weight, self.weight_scale, self.bias)
        return restore_shape(y, x)
