"""A quantized KV cache for ``transformers`` generation: ``past_key_values=QuantizedKVCache(...)``.

int8 or int4 codes, asymmetric, keys per channel and values per token in groups, the
most recent tokens kept in float (KIVI); see :mod:`mixprec.nn.kv_cache` for the exact
layout and rounding. Each step the attention layer receives the cached keys and values
dequantized to the model's dtype. Needs ``transformers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mixprec.nn.kv_cache import QuantizedKV, check_kv_config

try:
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise ImportError("mixprec.kv needs transformers: pip install 'mixprec[hf]'") from exc


class QuantizedKVLayer(DynamicLayer):
    """One layer of :class:`QuantizedKVCache` (a ``transformers`` cache layer)."""

    is_croppable = False

    def __init__(self, bits: int, group_size: int, residual: int) -> None:
        super().__init__()
        self.store = QuantizedKV(bits, group_size, residual)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.device.type != "cpu":
            raise ValueError(f"the mixprec KV cache runs on the CPU; got states on {key_states.device}")
        self.store.append(key_states, value_states)
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
    """

    def __init__(self, bits: int = 8, group_size: int = 64, residual: int = 64, max_length: int | None = None) -> None:
        check_kv_config(bits, group_size, residual)
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        self.bits, self.group_size, self.residual, self.max_length = bits, group_size, residual, max_length

        settings = (bits, group_size, residual)

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
