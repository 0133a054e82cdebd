"""Per-layer latency of each candidate kernel, measured on this CPU, and an additive model
of whole-model latency built from it.

Each quantizable layer is timed alone on the input it receives when the model runs the
given batch (captured with a forward pre-hook), once as float32 and once per candidate
precision (interleaved rounds, median seconds per call). The rest of the model (attention
arithmetic, norms, activations, ...) is ``base_s`` = the whole float32 model's median time
minus the sum of its layers' float32 times, so a policy's predicted latency is
``base_s + sum of its layers' times``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor, nn

from mixprec.errors import CalibrationError, PolicyError
from mixprec.io_utils import write_text_atomic
from mixprec.policy import quantizable_names
from mixprec.precision import build, check_applicable, parse_precision
from mixprec.quantize import run_batch
from mixprec.timing import interleaved_medians


@dataclass(frozen=True)
class LatencyRow:
    """Median seconds per call of one layer at one precision, on its captured input."""

    layer: str
    precision: str
    seconds: float


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer latencies and the float remainder of the model (seconds)."""

    base_s: float
    model_fp32_s: float
    rows: tuple[LatencyRow, ...]

    def seconds(self, layer: str, precision: str) -> float:
        for row in self.rows:
            if row.layer == layer and row.precision == precision:
                return row.seconds
        raise KeyError(f"no latency for layer {layer!r} at {precision!r}")

    def predict(self, choices: dict[str, str]) -> float:
        """Predicted seconds of the model with ``choices`` (layer -> precision); layers not
        named run float32."""
        times = {(row.layer, row.precision): row.seconds for row in self.rows}
        layers = {row.layer for row in self.rows}
        unknown = sorted(set(choices) - layers)
        if unknown:
            raise PolicyError(f"layers {unknown[:3]} have no latency measurement")
        return self.base_s + sum(times[(layer, choices.get(layer, "fp32"))] for layer in sorted(layers))

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps({"base_s": self.base_s, "model_fp32_s": self.model_fp32_s,
                           "rows": [asdict(row) for row in self.rows]}, indent=2) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(float(data["base_s"]), float(data["model_fp32_s"]),
                       tuple(LatencyRow(**row) for row in data["rows"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CalibrationError(f"{str(path)!r} is not a latency table: {exc}") from None


def capture_layer_inputs(model: nn.Module, batch: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """The first positional input each named layer receives when ``model`` runs ``batch``."""
    inputs: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            inputs.setdefault(name, args[0].detach().clone())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in inputs]
    if missing:
        raise CalibrationError(f"layers {missing[:3]} did not run on the batch, so their latency cannot be "
                               "measured; leave them out (layers=) or use a batch that reaches them")
    return inputs


def measure_latency(model: nn.Module, batch: Any, candidates: Sequence[str], layers: Sequence[str] | None = None,
                    rounds: int = 7, progress: bool = True) -> LatencyTable:
    """Time every layer (default: all quantizable ones that run) at float32 and at each
    applicable candidate on ``batch``'s activations; see the module docstring."""
    if rounds < 1:
        raise CalibrationError(f"rounds must be >= 1, got {rounds}")
    if not candidates or isinstance(candidates, str):
        raise PolicyError(f"measure_latency needs a list of candidate precisions, got {candidates!r}")
    precisions = [parse_precision(name) for name in candidates]
    static = [p.name for p in precisions if p.is_static]
    if static:
        raise PolicyError(f"{static} need calibrated activations; time dynamic and weight-only precisions")
    order = list(dict(model.named_modules()))
    names = sorted(quantizable_names(model), key=order.index) if layers is None else list(layers)
    unknown = sorted(set(names) - quantizable_names(model))
    if unknown:
        raise PolicyError(f"{unknown[:3]} are not quantizable layers of this {type(model).__name__}")
    inputs = capture_layer_inputs(model, batch, names)
    rows: list[LatencyRow] = []
    with torch.no_grad(), Progress(transient=True, disable=not progress) as bar:
        model_fp32_s = interleaved_medians({"model": lambda: run_batch(model, batch)}, rounds)["model"]
        task = bar.add_task("layer latency", total=len(names))
        for name in names:
            module, x = model.get_submodule(name), inputs[name]
            variants = {"fp32": module}
            for precision in precisions:
                try:
                    check_applicable(name, module, precision)
                except PolicyError:
                    continue
                variants[precision.name] = build(module, precision)
            medians = interleaved_medians({label: (lambda m=m, x=x: m(x)) for label, m in variants.items()}, rounds)
            rows += [LatencyRow(name, label, seconds) for label, seconds in medians.items()]
            bar.advance(task)
    float_layers = sum(row.seconds for row in rows if row.precision == "fp32")
    return LatencyTable(model_fp32_s - float_layers, model_fp32_s, tuple(rows))
