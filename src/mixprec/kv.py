"""A quantized KV cache for ``transformers`` generation: ``past_key_values=QuantizedKVCache(...)``.

int8 or int4 codes, asymmetric, keys per channel and values per token in groups, the
most recent tokens kept in float (KIVI); see :mod:`mixprec.nn.kv_cache` for the exact
layout and rounding. Needs ``transformers``.

Two ways to attend:

- ``attention="dequantize"`` (default, any model): each step the attention layer receives
  the cached keys and values dequantized to the model's dtype.
- ``attention="codes"``, with :func:`use_code_attention` applied to the model: decode steps
  (one new token, no padding mask) read the codes directly in a native kernel, never
  building float keys and values; steps with several new tokens (prefill, teacher forcing)
  or a padding mask dequantize and run PyTorch's scaled-dot-product attention. A cache in
  this mode hands the model stand-ins instead of tensors, so a model still on another
  attention implementation fails with a message saying what to call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mixprec.nn.kv_cache import QuantizedKV, check_kv_config

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise ImportError("mixprec.kv needs transformers: pip install 'mixprec[hf]'") from exc

#: The ``attn_implementation`` name :func:`use_code_attention` registers.
CODE_ATTENTION = "mixprec_kv_codes"
ATTENTION_MODES = ("dequantize", "codes")


class CachedStates(Tensor):
    """What a cache in ``attention="codes"`` mode returns from ``update`` instead of keys or
    values: an empty tensor holding the layer's :class:`QuantizedKV`. Only
    :func:`code_attention` reads it; any tensor operation on it raises."""

    store: QuantizedKV

    @staticmethod
    def __new__(cls, store: QuantizedKV) -> CachedStates:
        stand_in = Tensor._make_subclass(cls, torch.empty(0))
        stand_in.store = store
        return stand_in

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(
            "this QuantizedKVCache was built with attention='codes', so its keys and values stay quantized and "
            "only mixprec's attention can read them: call mixprec.kv.use_code_attention(model) first, or build "
            "the cache with attention='dequantize'")


def code_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[Tensor, None]:
    """A ``transformers`` attention function: decode steps over a :class:`QuantizedKVCache` in
    ``"codes"`` mode read the codes (:meth:`QuantizedKV.attend`); everything else is PyTorch's
    scaled-dot-product attention, on the dequantized cache where the cache is quantized."""
    if not isinstance(key, CachedStates):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    store = key.store
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask_free = attention_mask is None or bool(
        attention_mask.all() if attention_mask.dtype is torch.bool else (attention_mask == 0).all())
    if query.shape[2] == 1 and mask_free and not dropout and kwargs.get("softcap") is None:
        return store.attend(query, scale).transpose(1, 2).contiguous(), None
    keys, values = store.states(query.dtype)
    return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use_code_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a ``transformers`` model to :func:`code_attention` (registered as
    ``"mixprec_kv_codes"``, with SDPA's mask format); returns the model. Float caches and
    caches in ``"dequantize"`` mode keep working: they get PyTorch's SDPA as before."""
    set_implementation = getattr(model, "set_attn_implementation", None)
    if set_implementation is None:
        raise TypeError(f"use_code_attention takes a transformers model (PreTrainedModel), got {type(model).__name__}")
    AttentionInterface.register(CODE_ATTENTION, code_attention)
    AttentionMaskInterface.register(CODE_ATTENTION, sdpa_mask)
    set_implementation(CODE_ATTENTION)
    if model.config._attn_implementation != CODE_ATTENTION:
        raise ValueError(f"{type(model).__name__} does not take a custom attention function (it kept "
                         f"{model.config._attn_implementation!r}); use attention='dequantize'")
    return model


class QuantizedKVLayer(DynamicLayer):
    """One layer of :class:`QuantizedKVCache` (a ``transformers`` cache layer)."""

    is_croppable = False

    def __init__(self, bits: int, group_size: int, residual: int, attention: str = "dequantize") -> None:
        super().__init__()
        self.store = QuantizedKV(bits, group_size, residual)
        self.attention = attention

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.device.type != "cpu":
            raise ValueError(f"the mixprec KV cache runs on the CPU; got states on {key_states.device}")
        self.store.append(key_states, value_states)
        if self.attention == "codes":
            return CachedStates(self.store), CachedStates(self.store)
        return self.store.states(key_states.dtype)

    def get_seq_length(self) -> int:
        return len(self.store)

    def reset(self) -> None:
        self.store = QuantizedKV(self.store.bits, self.store.group_size, self.store.residual)
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the mixprec KV cache does not support beam search reordering")


class QuantizedKVCache(Cache):
    """KIVI-style quantized cache usable as ``past_key_values`` in ``model.generate``.

    Args:
        bits: 8 or 4.
        group_size: tokens per key chunk and channels per value group (even; for values it
            must divide ``head_dim``, or exceed it to use the whole head).
        residual: most recent tokens kept in float (at least this many, fewer than
            ``residual + group_size``).
        max_length: refuse to cache more tokens than this (e.g. the model's
            ``config.max_position_embeddings``); None for no limit.
        attention: ``"dequantize"`` or ``"codes"`` (see the module docstring; ``"codes"``
            needs :func:`use_code_attention` on the model).
    """

    def __init__(self, bits: int = 8, group_size: int = 64, residual: int = 64, max_length: int | None = None,
                 attention: str = "dequantize") -> None:
        check_kv_config(bits, group_size, residual)
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.bits, self.group_size, self.residual, self.max_length = bits, group_size, residual, max_length
        self.attention = attention

        settings = (bits, group_size, residual, attention)

        class Layer(QuantizedKVLayer):
            def __init__(self) -> None:
                super().__init__(*settings)

        super().__init__(layer_class_to_replicate=Layer)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.max_length is not None:
            have = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
            if have + key_states.shape[-2] > self.max_length:
                raise ValueError(f"generation beyond the model's context: {have} cached + {key_states.shape[-2]} new "
                                 f"tokens > {self.max_length} (max_length)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Exact bytes the cache holds, over all layers."""
        return sum(layer.store.nbytes() for layer in self.layers if isinstance(layer, QuantizedKVLayer))


def float_cache_bytes(cache: Cache) -> int:
    """Bytes of a ``transformers`` float cache (keys and values of every layer)."""
    states = (getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values"))
    return sum(t.nbytes for t in states if isinstance(t, Tensor))
