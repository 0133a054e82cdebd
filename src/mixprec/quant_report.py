"""What each layer of a model became: precision, kernel, rule and exact bytes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields

from rich.console import Console
from rich.table import Table

from mixprec.io_utils import write_text_atomic


@dataclass(frozen=True)
class LayerReport:
    """One module: ``bytes_before`` is its float storage, ``bytes_after`` what it holds now.

    ``weight_rounding`` is ``nearest`` or ``gptq`` for integer weights, ``-`` otherwise;
    ``slow_path`` says why the layer runs slower than its precision can on this machine
    (a missing CPU feature or native build), empty when it does not.
    """

    name: str
    module_type: str
    precision: str
    kernel: str
    rule: str
    bytes_before: int
    bytes_after: int
    overflow_count: int = 0
    weight_rounding: str = "-"
    slow_path: str = ""


@dataclass(frozen=True)
class QuantReport:
    """Per-layer report plus model totals.

    ``total_bytes`` is the sum of ``nbytes`` of every distinct tensor the model holds
    (parameters and buffers, quantized or not); ``fp32_bytes`` the same before quantizing.
    """

    layers: tuple[LayerReport, ...]
    total_bytes: int
    fp32_bytes: int

    @property
    def compression(self) -> float:
        """``fp32_bytes / total_bytes``."""
        return self.fp32_bytes / self.total_bytes if self.total_bytes else float("inf")

    @property
    def overflow_count(self) -> int:
        """Finite weights that became +-inf when rounded to a half format."""
        return sum(layer.overflow_count for layer in self.layers)

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[layer.name for layer in self.layers][:8]}")

    def to_dict(self) -> dict[str, object]:
        return {
            "total_bytes": self.total_bytes,
            "fp32_bytes": self.fp32_bytes,
            "overflow_count": self.overflow_count,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """CSV text with one row per layer; written atomically to ``path`` if given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(LayerReport)], lineterminator="\n")
        writer.writeheader()
        for layer in self.layers:
            writer.writerow(asdict(layer))
        text = buffer.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """JSON text of :meth:`to_dict`; written atomically to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text

    def table(self) -> Table:
        table = Table(title=f"mixprec: {self.fp32_bytes:,} B -> {self.total_bytes:,} B "
                      f"({self.compression:.2f}x smaller)")
        for column in ("layer", "type", "precision", "rounding", "kernel", "rule", "bytes before", "bytes after"):
            # names wrap rather than lose their distinguishing end to an ellipsis
            table.add_column(column, justify="right" if column.startswith("bytes") else "left", overflow="fold")
        for layer in self.layers:
            kernel = f"{layer.kernel} [SLOW: {layer.slow_path}]" if layer.slow_path else layer.kernel
            table.add_row(layer.name, layer.module_type, layer.precision, layer.weight_rounding, kernel,
                          layer.rule, f"{layer.bytes_before:,}", f"{layer.bytes_after:,}")
        return table

    def __str__(self) -> str:
        console = Console(width=max(100, shutil.get_terminal_size((160, 24)).columns), record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()
