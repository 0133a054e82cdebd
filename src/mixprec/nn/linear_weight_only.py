"""Grouped weight-only linears: int4 ``w4gN`` (float32 activations), ``w4a8gN`` (the same int4
storage with dynamic int8 activations) and int8 ``w8gN``. The per-channel int8 weight-only
``w8`` shares the int8 linears' storage and lives in :mod:`mixprec.nn.linear_int8`.

Kernels: :mod:`mixprec.kernels.weight_only` and :mod:`mixprec.kernels.w4a8_linear`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixprec.formats import QuantSpec, fp16_scale, pack_int4
from mixprec.kernels import native
from mixprec.kernels import w4a8_linear as w4a8
from mixprec.kernels.cpu import native_slow_path
from mixprec.kernels.huge_pages import zeros_in_huge_pages
from mixprec.kernels.weight_only import (
    W4_FALLBACK_KERNEL_NAME,
    W4_KERNEL_NAME,
    W8G_KERNEL_NAME,
    w4_dequantize_torch,
    w4_linear,
    w8g_dequantize,
    w8g_linear,
)
from mixprec.nn.base import (
    QuantizedModule,
    W8GroupStorage,
    as_float32_matrix,
    check_linear_input,
    held_state_tensors,
    restore_shape,
    round_weight,
    round_weight_int4_packed,
    w4_group_spec,
)


class W4Linear(QuantizedModule):
    """``w4gN``: int4 weights in groups of N along the input dimension, float32 activations.

    Codes are symmetric in [-7, 7], packed two per byte (see :mod:`mixprec.formats.int4`);
    each group has an fp16 scale ``max|w| / 7`` (rounded to fp16 first, then used for
    quantizing, and kept at or above 2**-14). Bytes per weight: 0.5 + 2 / N.
    Forward: ``y = x @ (codes * scale)^T + b`` in float32 (``codes * scale`` is exact).
    """

    #: ``(x [M, K] float32, packed, scale, bias) -> y [M, N]``: the kernel entry point.
    matmul = staticmethod(w4_linear)

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.precision = f"w4g{group_size}"
        self.register_buffer("weight_packed", zeros_in_huge_pages((out_features, in_features // 2), torch.uint8))
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
        return w4_group_spec(self.group_size)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, hessian: Tensor | None = None) -> W4Linear:
        """Quantize ``linear`` (GPTQ if ``hessian`` is given, else round to nearest)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        if hessian is None:
            packed, qp = round_weight_int4_packed(linear.weight, module.spec, scale_fn=fp16_scale)
        else:
            codes, qp = round_weight(linear.weight, module.spec, hessian, scale_fn=fp16_scale)
            packed = pack_int4(codes)
        module.weight_packed.copy_(packed.view(module.weight_packed.shape))
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
        return restore_shape(self.matmul(rows, self.weight_packed, self.weight_scale, self.bias), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class W4A8Linear(W4Linear):
    """``w4a8gN``: :class:`W4Linear`'s int4 codes and scales, activations quantized per row to int8.

    Forward: ``y = sx * sum_g s_g * (xq . q)_g + b`` with exact integer group dot products
    (see :mod:`mixprec.kernels.w4a8_linear` for the rounding). Faster than ``w4`` from a few
    rows up, at the cost of the activation rounding that ``int8`` also pays; outputs of a
    row do not depend on the other rows of the batch. The group size must be a multiple of 4
    (the VNNI kernel multiplies 4 codes per lane).

    With a group size that is a multiple of 8 the module holds the codes and scales only in the
    kernel's blocked layout (``codes_blocked``, ``scale_blocked``: 32 channels x 8 codes per 128
    bytes, read in place at memory speed while decoding; out_features padded to a multiple of 32).
    ``weight_packed`` and ``weight_scale`` then read back the ordinary packed ``[out, in/2]`` codes and
    ``[out, in/G]`` scales (computed, for exports and inspection), and ``state_dict()`` carries those,
    so checkpoints do not depend on the layout; loading converts them again. Bytes are counted as
    the packed form's (the blocked one holds more only when out_features is not a multiple of 32).
    """

    matmul = staticmethod(w4a8.w4a8_linear)

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32,
                 blocked: bool | None = None) -> None:
        """``blocked``: hold the blocked layout (default: whenever the group size allows it) or the packed one."""
        if group_size % 4:
            raise ValueError(f"w4a8 needs a group size divisible by 4, got {group_size}")
        if blocked and not w4a8.blocked_layout_applies(group_size):
            raise ValueError(f"the blocked w4a8 layout needs a group size divisible by {w4a8.BLOCK_CODES}, "
                             f"got {group_size}")
        super().__init__(in_features, out_features, bias, group_size)
        self.precision = f"w4a8g{group_size}"
        self.blocked = w4a8.blocked_layout_applies(group_size) if blocked is None else blocked
        if self.blocked:
            packed, scale = self._buffers.pop("weight_packed"), self._buffers.pop("weight_scale")
            code_shape, scale_shape = w4a8.blocked_shapes(out_features, in_features, group_size)
            self.register_buffer("codes_blocked", zeros_in_huge_pages(code_shape, torch.uint8))
            self.register_buffer("scale_blocked", torch.empty(scale_shape, dtype=torch.float16))
            self._store(packed, scale)

    @property
    def weight_packed(self) -> Tensor:
        """The packed ``[out, in/2]`` int4 codes (a computed copy when the module holds the blocked layout)."""
        if "codes_blocked" in self._buffers:
            return w4a8.codes_from_blocked(self.codes_blocked, self.out_features)
        return self._packed_buffer("weight_packed")

    @property
    def weight_scale(self) -> Tensor:
        """The fp16 ``[out, in/G]`` group scales (a computed copy when the module holds the blocked layout)."""
        if "scale_blocked" in self._buffers:
            return w4a8.scale_from_blocked(self.scale_blocked, self.out_features)
        return self._packed_buffer("weight_scale")

    def _packed_buffer(self, name: str) -> Tensor:
        if name not in self._buffers:  # while W4Linear.__init__ registers it
            raise AttributeError(name)
        return self._buffers[name]

    def _store(self, packed: Tensor, scale: Tensor) -> None:
        """Sets the codes and scales from the packed ``[out, in/2]`` / ``[out, in/G]`` form."""
        if self.blocked:
            w4a8.to_blocked(packed, scale, self.codes_blocked, self.scale_blocked)
        else:
            self._buffers["weight_packed"].copy_(packed)
            self._buffers["weight_scale"].copy_(scale)

    @classmethod
    def _holding(cls, source: W4Linear, blocked: bool | None) -> W4A8Linear:
        """A module with ``source``'s codes, scales and bias, in the blocked or the packed layout."""
        module = cls(source.in_features, source.out_features, source.bias is not None, source.group_size, blocked)
        module._store(source.weight_packed, source.weight_scale)
        if module.bias is not None:
            module.bias.copy_(source.bias)
        return module

    def relaid(self, blocked: bool) -> W4A8Linear:
        """A module with the same codes, scales and bias in the blocked or the packed layout."""
        return W4A8Linear._holding(self, blocked)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, hessian: Tensor | None = None) -> W4A8Linear:
        """Quantize ``linear`` as :meth:`W4Linear.from_float` does (the same codes and scales)."""
        return cls._holding(W4Linear.from_float(linear, group_size, hessian), None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.blocked:
            return super().forward(x)
        check_linear_input(x, self.in_features, type(self).__name__)
        y = w4a8.w4a8_linear_blocked(as_float32_matrix(x), self.codes_blocked, self.scale_blocked,
                                     self.out_features, self.bias)
        return restore_shape(y, x)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.blocked:
            del destination[prefix + "codes_blocked"], destination[prefix + "scale_blocked"]
            packed, scale = w4a8.from_blocked(self.codes_blocked, self.scale_blocked, self.out_features)
            destination[prefix + "weight_packed"], destination[prefix + "weight_scale"] = packed, scale

    def held_state(self) -> tuple[list[Tensor], int] | None:
        """For byte accounting without converting: the state-dict tensors held as saved (the bias), and the bytes of
        the packed codes (uint8 ``[out, in/2]``) and scales (float16 ``[out, in/G]``) computed from the blocked layout
        on saving (None: the packed layout is held as saved)."""
        if not self.blocked:
            return None
        groups = self.in_features // self.group_size
        computed = self.out_features * self.in_features // 2 + self.out_features * groups * 2
        return held_state_tensors(self, ("codes_blocked", "scale_blocked")), computed

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.blocked:
            return
        for name in ("codes_blocked", "scale_blocked"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        expected = {"weight_packed": (torch.uint8, (self.out_features, self.in_features // 2)),
                    "weight_scale": (torch.float16, (self.out_features, self.in_features // self.group_size))}
        loaded = {}
        for name, (dtype, shape) in expected.items():
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            tensor = state_dict.get(key)
            if tensor is None:
                missing_keys.append(key)
            elif tensor.dtype != dtype or tuple(tensor.shape) != shape:
                error_msgs.append(f"{key}: expected {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
            else:
                loaded[name] = tensor
        if len(loaded) == 2:
            self._store(loaded["weight_packed"], loaded["weight_scale"])

    @property
    def kernel(self) -> str:  # type: ignore[override]
        name = w4a8.kernel_name(self.blocked)
        if name == w4a8.FALLBACK_KERNEL_NAME:
            return name
        layout = "blocked layout read in place" if self.blocked else "packed layout unpacked per call"
        return f"{name}; {layout}"

    @property
    def slow_path(self) -> str | None:
        if w4a8.kernel_name(self.blocked) != w4a8.FALLBACK_KERNEL_NAME:
            return None
        return native_slow_path() or "the native build has no AVX512-VNNI kernel (this CPU or compiler lacks it)"


class W8GroupLinear(W8GroupStorage):
    """``w8gN``: int8 weights in groups of N along the input dimension, float32 activations.

    Codes are symmetric in [-127, 127], one per byte; each group has an fp16 scale
    ``max|w| / 127`` (rounded to fp16 first, then used for quantizing, kept at or above
    2**-14), codes ``clamp(round_half_even(w / scale), -127, 127)``. Bytes per weight:
    1 + 2 / N. With N = 32 this is llama.cpp's Q8_0 block, value for value.
    Forward: ``y = x @ (codes * scale)^T + b`` in float32 (``codes * scale`` is exact).
    """

    kernel = W8G_KERNEL_NAME

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32) -> None:
        super().__init__(out_features, in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, hessian: Tensor | None = None) -> W8GroupLinear:
        """Quantize ``linear`` (GPTQ if ``hessian`` is given, else round to nearest)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        module._set_codes(linear.weight, hessian)
        if module.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self) -> Tensor:
        return w8g_dequantize(self.weight, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, type(self).__name__)
        return restore_shape(w8g_linear(as_float32_matrix(x), self.weight, self.weight_scale, self.bias), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

