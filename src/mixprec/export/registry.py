"""What each export format can hold, and the refusal of what it cannot.

A format says, for a layer kind (``"linear"`` or ``"embedding"``) and a precision name,
whether it stores that layer exactly, and otherwise which precision nearest to it it does
store; a format whose ``kinds`` lack ``"conv"`` holds convolutions in fp32 only. :func:`refuse_unheld`
checks every layer before anything is written and names them all in one error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mixprec.errors import ExportError
from mixprec.nn import QuantizedConv, QuantizedModule
from mixprec.nn.conv_layout import is_conv
from mixprec.precision import is_linear


@dataclass(frozen=True)
class ExportLayer:
    """One layer as an exporter sees it: its name, kind and precision (``fp32`` when float)."""

    name: str
    kind: str
    precision: str
    module: nn.Module | None = None


@dataclass(frozen=True)
class ExportFormat:
    """A registered format.

    Attributes:
        name: the ``format=`` value.
        description: one line for ``--help`` and errors.
        nearest: ``(kind, precision) -> None`` when the format holds it exactly, else the
            held precision nearest to it (a name a user can put in a policy).
        write: ``(model, path, options) -> None``; writes a finished file or folder at ``path``.
        options: the keyword options ``write`` takes (others are refused).
        folder: whether the output is a folder (else one file).
        kinds: the layer kinds the format carries quantized.
    """

    name: str
    description: str
    nearest: Callable[[str, str], str | None]
    write: Callable[[nn.Module, Path, dict], None]
    options: tuple[str, ...] = ()
    folder: bool = False
    #: Layer kinds ``nearest`` answers for; a layer of another kind is held only in fp32.
    kinds: tuple[str, ...] = ("linear", "embedding")


FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to :data:`FORMATS` under its name."""
    FORMATS[fmt.name] = fmt
    return fmt


def find_format(name: object) -> ExportFormat:
    """The registered format called ``name``, or ExportError listing the known ones."""
    if not isinstance(name, str) or name not in FORMATS:
        raise ExportError(f"unknown export format {name!r}; choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"embedding"``, ``"conv"`` or None for a module (float or quantized) of a model."""
    if isinstance(module, QuantizedConv) or is_conv(module):
        return "conv"
    if isinstance(module, QuantizedModule):
        return "embedding" if hasattr(module, "num_embeddings") else "linear"
    if is_linear(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def model_layers(model: nn.Module) -> list[ExportLayer]:
    """Every Linear-like and Embedding-like layer of ``model`` with its current precision."""
    layers = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None and name:
            precision = module.precision if isinstance(module, QuantizedModule) else "fp32"
            layers.append(ExportLayer(name, kind, precision, module))
    return layers


def refuse_unheld(fmt: ExportFormat, layers: Iterable[ExportLayer]) -> None:
    """Raise ExportError naming every layer whose precision ``fmt`` cannot hold, with the
    nearest precision it can."""
    refused = []
    for layer in layers:
        if layer.kind not in fmt.kinds:
            if layer.precision != "fp32":
                what = {"conv": "convolutions"}.get(layer.kind, f"{layer.kind} layers")
                refused.append(f"{layer.name!r} ({layer.kind}, {layer.precision}): use fp32 ({fmt.name} export does "
                               f"not carry quantized {what} yet)")
            continue
        nearest = fmt.nearest(layer.kind, layer.precision)
        if nearest is not None:
            refused.append(f"{layer.name!r} ({layer.kind}, {layer.precision}): use {nearest}")
    if refused:
        shown = "; ".join(refused[:8]) + (f"; and {len(refused) - 8} more" if len(refused) > 8 else "")
        raise ExportError(f"format {fmt.name!r} cannot hold {len(refused)} layer(s) as quantized: {shown}")
