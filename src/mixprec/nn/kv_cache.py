"""Quantized key/value storage for one attention layer (KIVI layout), in plain PyTorch.

Tensors are ``[batch, kv_heads, tokens, head_dim]``. Tokens enter a float *residual*
window; whenever the window holds ``residual + group`` tokens, its oldest ``group`` tokens
are quantized as one chunk and appended to the integer storage, so the most recent
``residual`` to ``residual + group - 1`` tokens always stay in float (KIVI).

- Keys are quantized **per channel**: one scale and zero point per (batch, head,
  channel) over each chunk of ``group`` tokens (keys have outlier channels).
- Values are quantized **per token**: one scale and zero point per (batch, head, token)
  over each group of ``group`` channels (``group`` must divide ``head_dim``; a larger
  group uses the whole head).

Rounding (asymmetric, unsigned ``bits``-bit codes, the rule of :mod:`mixprec.formats`):
``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``, ``scale = fp16(max((hi - lo) / (2**bits - 1),
2**-14))``, ``zero = clamp(-round_half_even(lo / scale), 0, 2**bits - 1)`` stored as uint8,
``q = clamp(round_half_even(x / scale) + zero, 0, 2**bits - 1)``; dequantized
``x' = (q - zero) * scale`` in float32. Scales are fp16 (2 bytes), zero points uint8 (1 byte).
4-bit codes are packed two per byte along ``head_dim`` (low nibble first).
Bytes per cached element: ``bits / 8 + 3 / group`` (keys) and ``bits / 8 + 3 / min(group,
head_dim)`` (values), plus the float residual window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixprec.errors import InputError
from mixprec.formats import FP16_SCALE_MIN, all_finite, fp16_scale, pack_int4, unpack_int4
from mixprec.kernels import native

KV_BITS = (4, 8)
#: Most query heads per KV head the native decode attention handles.
MAX_QUERY_GROUP = 8


def check_kv_config(bits: int, group_size: int, residual: int) -> None:
    """Refuse settings the cache cannot honour, saying what would fit."""
    if bits not in KV_BITS:
        raise InputError(f"KV cache bits must be 4 or 8, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise InputError(f"KV cache group size must be an even integer >= 2, got {group_size!r}")
    if not isinstance(residual, int) or residual < 0:
        raise InputError(f"KV cache residual window must be an integer >= 0, got {residual!r}")


def _affine(x_min: Tensor, x_max: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(scale as fp16-representable float32, zero point as float32 integer) per slot."""
    top = float(2**bits - 1)
    lo, hi = x_min.clamp(max=0.0), x_max.clamp(min=0.0)
    scale = fp16_scale(((hi - lo) / top).clamp(min=FP16_SCALE_MIN))
    zero = torch.round(-lo / scale).clamp(0.0, top)
    return scale, zero


def _codes(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    q = x / scale
    q.round_().add_(zero).clamp_(0.0, float(2**bits - 1))
    codes = q.to(torch.uint8)
    return pack_int4(codes) if bits == 4 else codes


def _unpack(codes: Tensor, bits: int) -> Tensor:
    return unpack_int4(codes, signed=False) if bits == 4 else codes


class QuantizedKV:
    """Keys and values of one layer: quantized chunks plus a float residual window."""

    def __init__(self, bits: int = 8, group_size: int = 64, residual: int = 64) -> None:
        check_kv_config(bits, group_size, residual)
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.key_codes: Tensor | None = None     # [B, H, T_q, D * bits / 8] uint8
        self.key_scale: Tensor | None = None     # [B, H, T_q / G, D] float16
        self.key_zero: Tensor | None = None      # [B, H, T_q / G, D] uint8
        self.value_codes: Tensor | None = None   # [B, H, T_q, D * bits / 8] uint8
        self.value_scale: Tensor | None = None   # [B, H, T_q, D / Gv] float16
        self.value_zero: Tensor | None = None    # [B, H, T_q, D / Gv] uint8
        self.recent_keys: Tensor | None = None   # [B, H, T_r, D] in the model's dtype
        self.recent_values: Tensor | None = None

    # ---- sizes ---------------------------------------------------------------------
    @property
    def quantized_tokens(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.shape[2]

    @property
    def recent_tokens(self) -> int:
        return 0 if self.recent_keys is None else self.recent_keys.shape[2]

    def __len__(self) -> int:
        return self.quantized_tokens + self.recent_tokens

    def nbytes(self) -> int:
        """Exact bytes held: codes, scales, zero points and the float window."""
        tensors = (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
                   self.value_zero, self.recent_keys, self.recent_values)
        return sum(t.nbytes for t in tensors if t is not None)

    # ---- writing -------------------------------------------------------------------
    def append(self, keys: Tensor, values: Tensor) -> None:
        """Add ``[B, H, T, D]`` keys and values (T >= 1) after the cached tokens."""
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(f"keys and values must both be [batch, heads, tokens, head_dim], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if keys.shape[-1] % 2:
            raise ValueError(f"head_dim must be even for the KV cache, got {keys.shape[-1]}")
        if self.recent_keys is not None and keys.shape[:2] + keys.shape[3:] != self.recent_keys.shape[:2] + \
                self.recent_keys.shape[3:]:
            raise ValueError(f"new states {tuple(keys.shape)} do not match the cached {tuple(self.recent_keys.shape)}")
        if not (all_finite(keys) and all_finite(values)):
            raise ValueError("keys or values hold NaN or Inf; a quantized cache cannot store them")
        if self.recent_keys is None:
            self.recent_keys, self.recent_values = keys.detach(), values.detach()
        else:
            self.recent_keys = torch.cat([self.recent_keys, keys.detach()], dim=2)
            self.recent_values = torch.cat([self.recent_values, values.detach()], dim=2)
        group = self.group_size
        while self.recent_tokens >= self.residual + group:
            self._quantize_chunk(self.recent_keys[:, :, :group], self.recent_values[:, :, :group])
            self.recent_keys = self.recent_keys[:, :, group:].contiguous()
            self.recent_values = self.recent_values[:, :, group:].contiguous()

    def _quantize_chunk(self, keys: Tensor, values: Tensor) -> None:
        keys, values = keys.float().contiguous(), values.float().contiguous()
        key_scale, key_zero = _affine(keys.amin(dim=2, keepdim=True), keys.amax(dim=2, keepdim=True), self.bits)
        key_codes = _codes(keys, key_scale, key_zero, self.bits)
        head_dim = values.shape[-1]
        value_group = min(self.group_size, head_dim)
        if head_dim % value_group:
            raise ValueError(f"KV cache group size {self.group_size} does not divide head_dim {head_dim}; "
                             f"use a divisor of {head_dim}")
        grouped = values.unflatten(-1, (head_dim // value_group, value_group))
        value_scale, value_zero = _affine(grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True),
                                          self.bits)
        value_codes = _codes(grouped, value_scale, value_zero, self.bits).flatten(-2)
        parts = {
            "key_codes": key_codes, "key_scale": key_scale.half(), "key_zero": key_zero.to(torch.uint8),
            "value_codes": value_codes, "value_scale": value_scale.squeeze(-1).half(),
            "value_zero": value_zero.squeeze(-1).to(torch.uint8),
        }
        for name, part in parts.items():
            old = getattr(self, name)
            setattr(self, name, part if old is None else torch.cat([old, part], dim=2))

    # ---- reading -------------------------------------------------------------------
    def dequantized(self) -> tuple[Tensor, Tensor] | None:
        """Float32 keys and values of the quantized tokens, or None when there are none."""
        if self.key_codes is None:
            return None
        assert self.key_scale is not None and self.key_zero is not None and self.value_codes is not None
        assert self.value_scale is not None and self.value_zero is not None
        tokens = self.key_codes.shape[2]
        keys = _unpack(self.key_codes, self.bits).float().unflatten(2, (tokens // self.group_size, self.group_size))
        keys = ((keys - self.key_zero.float().unsqueeze(3)) * self.key_scale.float().unsqueeze(3)).flatten(2, 3)
        groups = self.value_scale.shape[-1]
        values = _unpack(self.value_codes, self.bits).float().unflatten(-1, (groups, -1))
        values = ((values - self.value_zero.float().unsqueeze(-1)) * self.value_scale.float().unsqueeze(-1)).flatten(-2)
        return keys, values

    def states(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """All cached keys and values, ``[B, H, len(self), D]`` in ``dtype``.

        For float32 with the native kernels, the quantized tokens are dequantized straight
        into the returned tensors (one pass, same bits as :meth:`dequantized`).
        """
        if self.recent_keys is None or self.recent_values is None:
            raise ValueError("the cache is empty")
        if self.key_codes is None:
            return self.recent_keys.to(dtype), self.recent_values.to(dtype)
        if dtype is not torch.float32 or not native.available():
            old = self.dequantized()
            assert old is not None
            return (torch.cat([old[0].to(dtype), self.recent_keys.to(dtype)], dim=2),
                    torch.cat([old[1].to(dtype), self.recent_values.to(dtype)], dim=2))
        assert self.key_scale is not None and self.key_zero is not None and self.value_codes is not None
        assert self.value_scale is not None and self.value_zero is not None
        batch, heads, recent, dim = self.recent_keys.shape
        done = self.quantized_tokens
        keys = torch.empty(batch, heads, done + recent, dim)
        values = torch.empty(batch, heads, done + recent, dim)
        native.kv_dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.group_size, self.bits,
                                  keys[:, :, :done])
        native.kv_dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.bits,
                                    values[:, :, :done])
        keys[:, :, done:] = self.recent_keys
        values[:, :, done:] = self.recent_values
        return keys, values

    # ---- attention -----------------------------------------------------------------
    def reads_codes(self, query: Tensor) -> bool:
        """Whether :meth:`attend` runs the native kernel on the codes for this query."""
        if self.key_codes is None or self.recent_keys is None or not native.kv_attention_available():
            return False
        assert self.value_scale is not None
        heads, dim = self.recent_keys.shape[1], self.recent_keys.shape[3]
        value_group = dim // self.value_scale.shape[-1]
        return (query.dtype is torch.float32 and self.recent_keys.dtype is torch.float32 and dim % 32 == 0
                and value_group % 32 == 0 and query.shape[1] % heads == 0
                and 1 <= query.shape[1] // heads <= MAX_QUERY_GROUP)

    def attend(self, query: Tensor, scaling: float) -> Tensor:
        """Attention of single-token queries ``[B, H * R, 1, D]`` over every cached token
        (no mask: decoding attends to the whole cache), returned ``[B, H * R, 1, D]``.

        Where :meth:`reads_codes` holds, the native kernel reads the codes directly (each key
        chunk's scales folded into the query, codes minus zero points as exact integers, see
        ``csrc/kv_attention.cpp``); otherwise the cache is dequantized and attended with
        PyTorch's scaled-dot-product attention. Both equal exact attention over the
        dequantized cache to float32 rounding.
        """
        if query.dim() != 4 or query.shape[2] != 1:
            raise ValueError(f"attend takes the queries of one new token, [batch, heads, 1, head_dim]; "
                             f"got {tuple(query.shape)}")
        if self.reads_codes(query):
            assert self.key_scale is not None and self.key_zero is not None and self.value_codes is not None
            assert self.value_scale is not None and self.value_zero is not None
            assert self.recent_keys is not None and self.recent_values is not None
            out = native.kv_decode_attention(query.squeeze(2).contiguous(), self.key_codes, self.key_scale,
                                             self.key_zero, self.value_codes, self.value_scale, self.value_zero,
                                             self.recent_keys.contiguous(), self.recent_values.contiguous(),
                                             self.group_size, self.bits, scaling)
            return out.unsqueeze(2)
        keys, values = self.states(query.dtype)
        return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=True)
