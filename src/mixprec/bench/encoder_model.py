"""A BERT-shaped transformer encoder stack in plain PyTorch, for benchmarks.

Post-norm blocks as in BERT: ``x = LN(x + O(attention(Q x, K x, V x)))``, then
``x = LN(x + down(GELU(up(x))))``. Module names: ``layers.{i}.attention.{query,key,value,
output}``, ``layers.{i}.ffn.{up,down}``, ``layers.{i}.{attention_norm,ffn_norm}``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of the head count {heads}")
        self.heads = heads
        self.query, self.key, self.value, self.output = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, hidden = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.output(context.transpose(1, 2).reshape(batch, seq, hidden))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention, self.ffn = SelfAttention(hidden, heads), FeedForward(hidden, ffn)
        self.attention_norm, self.ffn_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention_norm(x + self.attention(x))
        return self.ffn_norm(x + self.ffn(x))


class Encoder(nn.Module):
    """``layers`` encoder blocks on hidden states ``[batch, seq, hidden]`` (defaults: BERT-small shape)."""

    def __init__(self, layers: int = 6, hidden: int = 384, heads: int = 12, ffn: int = 1536) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
