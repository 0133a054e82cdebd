"""A small transformer encoder as a float PyTorch model and as an int8 or int16 (16x8) graph
built from it.

Topology (per the TinyMind encoder): token embedding, a fixed sinusoidal positional
encoding, then per block ``LayerNorm -> attention -> residual add -> LayerNorm -> dense + ReLU
-> dense -> residual add``, and a per-token dense head. Attention is single-head, either
softmax (``softmax(q k^T / sqrt(P)) v``) or linear with the ReLU feature map; the integer
forms are in :mod:`mixprec.integer.ops.attention`. :func:`build_encoder_graph` calibrates every
int8 tensor on the ids it is given.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.build.layers import calibrate_as, fully_connected_from
from mixprec.integer.core.tensors import TensorSpec
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import (
    AddConstantNode,
    AddNode,
    EmbeddingNode,
    LayerNormNode,
    LinearAttentionNode,
    SoftmaxAttentionNode,
)

ATTENTIONS = ("softmax", "linear")


def sinusoidal_encoding(steps: int, width: int) -> torch.Tensor:
    """``[steps, width]``: ``sin(p / 10000^(2i/width))`` on even channels, ``cos`` on odd ones."""
    position = torch.arange(steps, dtype=torch.float64)[:, None]
    frequency = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(steps, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table.float()


class EncoderBlock(nn.Module):
    def __init__(self, width: int, hidden: int, attention: str, epsilon: float, norm_epsilon: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=norm_epsilon), nn.LayerNorm(width, eps=norm_epsilon)
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.attention, self.epsilon = attention, epsilon

    def forward(self, h: torch.Tensor, record: dict[str, torch.Tensor] | None = None, prefix: str = "") -> torch.Tensor:
        normed = self.norm1(h)
        q, k, v = self.query(normed), self.key(normed), self.value(normed)
        if self.attention == "softmax":
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            mixed = torch.softmax(scores, dim=-1) @ v
        else:
            q, k = torch.relu(q), torch.relu(k)
            scores = None
            normalizer = (q * k.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + self.epsilon
            mixed = (q @ (k.transpose(-1, -2) @ v)) / normalizer
        h1 = h + mixed
        normed2 = self.norm2(h1)
        up = torch.relu(self.up(normed2))
        down = self.down(up)
        out = h1 + down
        if record is not None:
            values = {"norm1": normed, "query": q, "key": k, "value": v, "scores": scores, "attention": mixed,
                      "residual1": h1, "norm2": normed2, "up": up, "down": down, "residual2": out}
            record.update({f"{prefix}{name}": value for name, value in values.items() if value is not None})
        return out


class TinyEncoder(nn.Module):
    """``[B, S]`` token ids -> ``[B, S, classes]`` logits (see module docstring)."""

    def __init__(self, vocabulary: int = 16, steps: int = 8, width: int = 8, hidden: int = 16, blocks: int = 2,
                 classes: int = 4, attention: str = "softmax", epsilon: float = 1.0,
                 norm_epsilon: float = 1e-5) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise InputError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.embedding = nn.Embedding(vocabulary, width)
        self.register_buffer("positions", sinusoidal_encoding(steps, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, hidden, attention, epsilon, norm_epsilon)
                                    for _ in range(blocks))
        self.head = nn.Linear(width, classes)
        self.attention = attention

    def stages(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor the int8 graph quantizes, by name."""
        record: dict[str, torch.Tensor] = {}
        embedded = self.embedding(ids)
        h = embedded + self.positions[: ids.shape[-1]]
        record |= {"embedding": embedded, "positions": self.positions, "encoded": h}
        for index, block in enumerate(self.blocks):
            h = block(h, record, f"block{index}.")
        record["logits"] = self.head(h)
        return record

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.stages(ids)["logits"]


def build_encoder_graph(model: TinyEncoder, calibration: torch.Tensor, range_margin: float = 0.0,
                        activations: str = "int8") -> Graph:
    """The integer graph of ``model`` (int32 ids in, logits out in the ``activations`` type),
    every grid calibrated on ``calibration`` ids ``[N, S]``; per-channel int8 weights.
    ``activations="int8"``: asymmetric int8 tensors, the embedding table quantized
    asymmetrically (its zero point is kept); ``"int16"``: TFLite's 16x8 mode, every tensor and
    the table symmetric int16 (:func:`~mixprec.integer.build.layers.calibrate_int16`), int64
    biases. ``range_margin``: every activation range widened by this fraction
    (:func:`~mixprec.integer.build.layers.calibrate`); the embedding table and the positional
    encoding are constants and keep their exact ranges."""
    if not isinstance(model, TinyEncoder):
        raise InputError(f"build_encoder_graph takes a TinyEncoder, got {type(model).__name__}")
    if activations not in ("int8", "int16"):
        raise InputError(f"activations must be 'int8' or 'int16' (16x8), got {activations!r}")
    if calibration.ndim != 2 or calibration.dtype not in (torch.int32, torch.int64):
        raise InputError(f"calibration must be integer token ids [N, steps], got {calibration.dtype} "
                         f"{tuple(calibration.shape)}")
    with torch.no_grad():
        observed = copy.deepcopy(model).double().stages(calibration.long())
    quant = {name: calibrate_as(activations, values, 0.0 if name == "positions" else range_margin)
             for name, values in observed.items()}
    table = model.embedding.weight.detach().double().numpy()
    table_quant = calibrate_as(activations, table)
    nodes: list = []

    def emit(node) -> int:  # noqa: ANN001
        nodes.append(node)
        return len(nodes)  # tensor 0 is the ids input

    def linear(layer: nn.Linear, source: int, source_quant: str, target: str, activation: str = "none") -> int:
        return emit(fully_connected_from(layer, source, quant[source_quant], quant[target], activation,
                                         activations=activations))

    h = emit(EmbeddingNode((0,), table_quant.nearest_codes(table, activations), table_quant))
    steps = calibration.shape[1]
    positions = model.positions[:steps].double().numpy()
    h = emit(AddConstantNode((h,), quant["positions"].nearest_codes(positions, activations), quant["positions"],
                             quant["encoded"]))
    h_name = "encoded"
    for index, block in enumerate(model.blocks):
        name = f"block{index}."
        norm = block.norm1
        n1 = emit(LayerNormNode((h,), norm.weight.detach().numpy(), norm.bias.detach().numpy(), norm.eps,
                                quant[name + "norm1"]))
        relu = "relu" if block.attention == "linear" else "none"
        q = linear(block.query, n1, name + "norm1", name + "query", relu)
        k = linear(block.key, n1, name + "norm1", name + "key", relu)
        v = linear(block.value, n1, name + "norm1", name + "value")
        if block.attention == "softmax":
            mixed = emit(SoftmaxAttentionNode((q, k, v), quant[name + "scores"], quant[name + "attention"]))
        else:
            mixed = emit(LinearAttentionNode((q, k, v), block.epsilon, quant[name + "attention"]))
        h1 = emit(AddNode((h, mixed), quant[name + "residual1"]))
        norm = block.norm2
        n2 = emit(LayerNormNode((h1,), norm.weight.detach().numpy(), norm.bias.detach().numpy(), norm.eps,
                                quant[name + "norm2"]))
        up = linear(block.up, n2, name + "norm2", name + "up", "relu")
        down = linear(block.down, up, name + "up", name + "down")
        h = emit(AddNode((h1, down), quant[name + "residual2"]))
        h_name = name + "residual2"
    linear(model.head, h, h_name, "logits")
    return Graph((TensorSpec("ids", (1, steps), None, "int32"),), tuple(nodes))
