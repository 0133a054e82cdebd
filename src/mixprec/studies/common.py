"""Measurements shared by the studies."""

from __future__ import annotations

from torch import nn

from mixprec.nn import QuantizedModule
from mixprec.precision import quantizable

#: Storage of the weight matrices only (no biases, scales or zero points).
WEIGHT_BUFFERS = ("weight", "weight_packed")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weight matrices of the layers mixprec quantizes (Linear, Conv1D,
    Embedding, float or quantized), without biases, scales, zero points or norms."""
    total = 0
    for module in model.modules():
        if quantizable(module) or isinstance(module, QuantizedModule):
            total += sum(t.nbytes for name, t in module.state_dict().items() if name in WEIGHT_BUFFERS)
    return total
