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
from collections.abc import Mapping

import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.build.layers import activation_types, calibrate_as, fully_connected_from
from mixprec.integer.core.tensors import Quantization, TensorSpec
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import (
    AddConstantNode,
    AddNode,
    EmbeddingNode,
    LayerNormNode,
    LinearAttentionNode,
    QuantizeNode,
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


def encoder_stages(model: TinyEncoder) -> tuple[str, ...]:
    """The names of the tensors whose activation type :func:`build_encoder_graph` lets one choose:
    ``encoded``, per block ``norm1, query, key, value, attention, residual1, norm2, up, down,
    residual2`` (prefixed ``block{i}.``), and ``logits``. (The embedding rows and the positional
    encoding take ``encoded``'s type, softmax attention's scores the attention's.)"""
    if not isinstance(model, TinyEncoder):
        raise InputError(f"encoder_stages takes a TinyEncoder, got {type(model).__name__}")
    names = ["encoded"]
    for index in range(len(model.blocks)):
        names += [f"block{index}.{name}" for name in ("norm1", "query", "key", "value", "attention", "residual1",
                                                        "norm2", "up", "down", "residual2")]
    return (*names, "logits")


def build_encoder_graph(model: TinyEncoder, calibration: torch.Tensor, range_margin: float = 0.0,
                        activations: str | Mapping[str, str] = "int8") -> Graph:
    """The integer graph of ``model`` (int32 ids in, logits out), every grid calibrated on
    ``calibration`` ids ``[N, S]``; per-channel int8 weights. Activation types: ``"int8"``
    (asymmetric int8 tensors, the embedding table quantized asymmetrically, its zero point
    kept), ``"int16"`` (TFLite's 16x8 mode: every tensor and the table symmetric int16,
    :func:`~mixprec.integer.build.layers.calibrate_int16`, int64 biases), or one type per stage
    of :func:`encoder_stages` (absent stages int8): each operator then runs in its output's type
    and an input of the other type reaches it through a QUANTIZE onto that tensor's grid in the
    operator's type. ``range_margin``: every activation range widened by this fraction
    (:func:`~mixprec.integer.build.layers.calibrate`); the embedding table and the positional
    encoding are constants and keep their exact ranges."""
    if not isinstance(model, TinyEncoder):
        raise InputError(f"build_encoder_graph takes a TinyEncoder, got {type(model).__name__}")
    types = activation_types(encoder_stages(model), activations)
    if calibration.ndim != 2 or calibration.dtype not in (torch.int32, torch.int64):
        raise InputError(f"calibration must be integer token ids [N, steps], got {calibration.dtype} "
                         f"{tuple(calibration.shape)}")
    with torch.no_grad():
        observed = copy.deepcopy(model).double().stages(calibration.long())
    grids: dict[tuple[str, str], Quantization] = {}

    def grid(stage: str, dtype: str) -> Quantization:
        if (stage, dtype) not in grids:
            grids[stage, dtype] = calibrate_as(dtype, observed[stage], 0.0 if stage == "positions" else range_margin)
        return grids[stage, dtype]

    nodes: list = []
    stage_of: dict[int, str] = {}
    dtype_of: dict[int, str] = {}
    converted: dict[tuple[int, str], int] = {}

    def emit(node, stage: str, dtype: str | None = None) -> int:  # noqa: ANN001
        nodes.append(node)
        tensor = len(nodes)  # tensor 0 is the ids input
        stage_of[tensor], dtype_of[tensor] = stage, dtype or types[stage]
        return tensor

    def read(tensor: int, dtype: str) -> int:
        """``tensor`` in ``dtype``: itself, or a QUANTIZE of it onto its stage's grid in that type."""
        if dtype_of[tensor] == dtype:
            return tensor
        if (tensor, dtype) not in converted:
            stage = stage_of[tensor]
            converted[tensor, dtype] = emit(QuantizeNode((tensor,), grid(stage, dtype), dtype), stage, dtype)
        return converted[tensor, dtype]

    def add(pair: tuple[int, int], target: str) -> int:
        dtype = types[target]
        return emit(AddNode(tuple(read(t, dtype) for t in pair), grid(target, dtype)), target)

    def linear(layer: nn.Linear, source: int, target: str, activation: str = "none") -> int:
        dtype = types[target]
        return emit(fully_connected_from(layer, read(source, dtype), grid(stage_of[source], dtype), grid(target, dtype),
                                         activation, activations=dtype), target)

    encoded_type = types["encoded"]
    table = model.embedding.weight.detach().double().numpy()
    table_quant = calibrate_as(encoded_type, table)
    h = emit(EmbeddingNode((0,), table_quant.nearest_codes(table, encoded_type), table_quant), "embedding",
             encoded_type)
    steps = calibration.shape[1]
    positions = model.positions[:steps].double().numpy()
    h = emit(AddConstantNode((h,), grid("positions", encoded_type).nearest_codes(positions, encoded_type),
                             grid("positions", encoded_type), grid("encoded", encoded_type)), "encoded")
    for index, block in enumerate(model.blocks):
        name = f"block{index}."
        n1 = emit(LayerNormNode((read(h, types[name + "norm1"]),), block.norm1.weight.detach().numpy(),
                                block.norm1.bias.detach().numpy(), block.norm1.eps,
                                grid(name + "norm1", types[name + "norm1"])), name + "norm1")
        relu = "relu" if block.attention == "linear" else "none"
        q = linear(block.query, n1, name + "query", relu)
        k = linear(block.key, n1, name + "key", relu)
        v = linear(block.value, n1, name + "value")
        mixed_type = types[name + "attention"]
        inputs = tuple(read(t, mixed_type) for t in (q, k, v))
        if block.attention == "softmax":
            mixed = emit(SoftmaxAttentionNode(inputs, grid(name + "scores", mixed_type),
                                              grid(name + "attention", mixed_type)), name + "attention")
        else:
            mixed = emit(LinearAttentionNode(inputs, block.epsilon, grid(name + "attention", mixed_type)),
                         name + "attention")
        h1 = add((h, mixed), name + "residual1")
        n2 = emit(LayerNormNode((read(h1, types[name + "norm2"]),), block.norm2.weight.detach().numpy(),
                                block.norm2.bias.detach().numpy(), block.norm2.eps,
                                grid(name + "norm2", types[name + "norm2"])), name + "norm2")
        up = linear(block.up, n2, name + "up", "relu")
        down = linear(block.down, up, name + "down")
        h = add((h1, down), name + "residual2")
    linear(model.head, h, "logits")
    return Graph((TensorSpec("ids", (1, steps), None, "int32"),), tuple(nodes))

