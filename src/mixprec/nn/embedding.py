"""Embedding tables in int8, int4 or half precision.

Lookups return float32 rows, or the dtype a later ``model.half()`` / ``.to(dtype)`` asked
for (the stored table never changes). Integer tables are asymmetric (a zero point per row
or group, subtracted on lookup): ``row = (q - zero_point) * scale`` for just the looked-up
rows, in float32.

- ``int8``: uint8 codes [0, 255], one float32 scale and one uint8 zero point per row.
  Bytes per row: ``dim + 5``.
- ``w4`` (row-wise) / ``w4gN`` (groups of N along the row): uint4 codes [0, 15] packed
  two per byte, an fp16 scale and a uint8 zero point per group.
  Bytes per row: ``dim / 2 + 3 * groups``.
- ``w8gN``: symmetric int8 codes [-127, 127] with an fp16 scale per group of N, no zero
  point: the same codes and scales as a ``w8gN`` Linear of the same weight (so a table tied
  to a language model's head quantizes identically in both places). Bytes per row:
  ``dim + 2 * groups``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.formats import (
    QParams,
    QuantSpec,
    fp16_scale,
    half_dtype,
    pack_int4,
    qparams_from_tensor,
    quantize,
    to_half,
    unpack_int4,
)
from mixprec.kernels.huge_pages import zeros_in_huge_pages
from mixprec.nn.base import QuantizedModule, W8GroupStorage, check_token_ids


def check_embedding(embedding: nn.Embedding) -> None:
    """Refuse embedding options whose float semantics a frozen table cannot keep."""
    if embedding.max_norm is not None:
        raise ValueError("embeddings with max_norm renormalize their weights on lookup; remove max_norm first")


class _LookupTable(QuantizedModule):
    """A quantized table: subclasses give :meth:`_lookup`, the float32 rows of valid ids."""

    num_embeddings: int

    def _lookup(self, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> Tensor:
        return self._lookup(torch.arange(self.num_embeddings))

    def forward(self, ids: Tensor) -> Tensor:
        check_token_ids(ids, self.num_embeddings, type(self).__name__)
        return self._lookup(ids).to(self.output_dtype)


class _IntEmbedding(_LookupTable):
    """Shared storage and lookup of asymmetric integer tables with per-group parameters."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 scale_dtype: torch.dtype) -> None:
        super().__init__()
        if embedding_dim % group_size:
            raise ValueError(f"group size {group_size} does not divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size = bits, group_size
        groups = embedding_dim // group_size
        width = embedding_dim if bits == 8 else embedding_dim // 2
        self.register_buffer("weight", zeros_in_huge_pages((num_embeddings, width), torch.uint8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, groups, dtype=scale_dtype))
        self.register_buffer("weight_zero_point", torch.zeros(num_embeddings, groups, dtype=torch.uint8))

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, signed=False, symmetric=False, granularity="group",
                         group_size=self.group_size)

    def _set_table(self, embedding: nn.Embedding) -> None:
        check_embedding(embedding)
        table = embedding.weight.detach().to(torch.float32)
        qp = qparams_from_tensor(table, self.spec)
        if self.weight_scale.dtype == torch.float16:
            scale = fp16_scale(qp.scale)
            # Refit the zero points to the rounded scale so 0 stays exactly representable.
            lo = table.reshape(*qp.scale.shape, self.group_size).amin(-1).clamp(max=0.0)
            zero_point = (-torch.round(lo / scale)).clamp(0, 15).to(torch.int32)
            qp = QParams(qp.spec, scale, zero_point)
        codes = quantize(table, qp)
        self.weight.copy_(codes if self.bits == 8 else pack_int4(codes))
        self.weight_scale.copy_(qp.scale)
        self.weight_zero_point.copy_(qp.zero_point)

    def _lookup(self, ids: Tensor) -> Tensor:
        """The float32 rows of valid ``ids``."""
        rows = F.embedding(ids, self.weight)
        codes = rows if self.bits == 8 else unpack_int4(rows, signed=False)
        groups = codes.reshape(*ids.shape, -1, self.group_size).to(torch.int32)
        zero_point = F.embedding(ids, self.weight_zero_point).unsqueeze(-1).to(torch.int32)
        scale = F.embedding(ids, self.weight_scale).unsqueeze(-1).to(torch.float32)
        return ((groups - zero_point).to(torch.float32) * scale).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, precision={self.precision}"


class Int8Embedding(_IntEmbedding):
    """``int8`` table: uint8 codes with a float32 scale and uint8 zero point per row."""

    precision = "int8"
    kernel = "uint8 row gather, dequantize looked-up rows"

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim, bits=8, group_size=embedding_dim,
                         scale_dtype=torch.float32)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim)
        module._set_table(embedding)
        return module


class W4Embedding(_IntEmbedding):
    """``w4`` / ``w4gN`` table: packed uint4 codes, fp16 scale and uint8 zero point per group."""

    kernel = "uint4 row gather, dequantize looked-up rows"

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None) -> None:
        group = embedding_dim if group_size is None else group_size
        super().__init__(num_embeddings, embedding_dim, bits=4, group_size=group, scale_dtype=torch.float16)
        self.precision = "w4" if group_size is None else f"w4g{group_size}"

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int | None = None) -> W4Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group_size)
        module._set_table(embedding)
        return module


class HalfEmbedding(QuantizedModule):
    """``bf16`` / ``fp16`` table; looked-up rows are returned as float32."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str = "bf16") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.precision = fmt
        self.kernel = f"{fmt} row gather"
        self.overflow_count = 0
        self.register_buffer("weight", zeros_in_huge_pages((num_embeddings, embedding_dim), half_dtype(fmt)))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, fmt: str) -> HalfEmbedding:
        check_embedding(embedding)
        module = cls(embedding.num_embeddings, embedding.embedding_dim, fmt)
        converted = to_half(embedding.weight, module.weight.dtype)
        module.weight.copy_(converted.tensor)
        module.overflow_count = converted.overflow_count
        return module

    def dequantized_weight(self) -> Tensor:
        return self.weight.to(torch.float32)

    def forward(self, ids: Tensor) -> Tensor:
        check_token_ids(ids, self.num_embeddings, type(self).__name__)
        return F.embedding(ids, self.weight).to(self.output_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, precision={self.precision}"


class W8GroupEmbedding(_LookupTable, W8GroupStorage):
    """``w8gN`` table: symmetric int8 codes with an fp16 scale per group of N along the row."""

    kernel = "int8 row gather, dequantize looked-up rows"

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32) -> None:
        super().__init__(num_embeddings, embedding_dim, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int = 32) -> W8GroupEmbedding:
        check_embedding(embedding)
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group_size)
        module._set_codes(embedding.weight)
        return module

    def _lookup(self, ids: Tensor) -> Tensor:
        """The float32 rows of valid ``ids``: ``code * scale``, exact."""
        groups = F.embedding(ids, self.weight).reshape(*ids.shape, -1, self.group_size).to(torch.float32)
        scale = F.embedding(ids, self.weight_scale).unsqueeze(-1).to(torch.float32)
        return (groups * scale).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, precision={self.precision}"
