"""Peer implementations that benchmarks compare against."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn


def torch_dynamic_int8(model: nn.Module, engine: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """PyTorch's eager dynamic int8 (``torch.ao`` ``quantize_dynamic``, per-tensor
    activations) of a copy of ``model``, packed for ``engine`` (``x86`` or ``onednn``);
    the returned callable sets that engine before every call so engines can interleave."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        torch.backends.quantized.engine = engine
        quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)

    def run(x: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = engine
        return quantized(x)

    return run
