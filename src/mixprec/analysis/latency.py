"""Per-layer latency of each candidate kernel, measured on this CPU inside the running
model, and an additive model of whole-model latency built from it.

Layers are timed where they run (forward hooks around each layer while the model runs the
given batch), so their inputs arrive as they do in real use, not warm in cache from a
previous identical call. The rest of the model (attention arithmetic, norms, activations,
...) is ``base_s``: for each configuration, the whole model's time without hooks minus the
sum of its layers' times; the median over configurations. A policy's predicted latency is
``base_s + sum of its layers' times``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from mixprec.analysis.sensitivity import applicable, dynamic_candidates
from mixprec.batchnorm import warn_unfolded
from mixprec.errors import CalibrationError, PolicyError
from mixprec.io_utils import write_text_atomic
from mixprec.policy import quantizable_names
from mixprec.precision import build
from mixprec.quantize import replace_module, run_batch
from mixprec.timing import paused_garbage_collector


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


class _LayerClock:
    """Forward hooks that add each layer's wall time (seconds) to a running total."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.totals = dict.fromkeys(names, 0.0)
        self._started: dict[str, float] = {}
        self._handles = []
        for name in names:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self._handles.append(module.register_forward_hook(lambda *_, n=name: self._stop(n)))

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.totals[name] += time.perf_counter() - self._started.pop(name)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _install(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        replace_module(model, name, module)


def measure_latency(model: nn.Module, batch: Any, candidates: Sequence[str], layers: Sequence[str] | None = None,
                    rounds: int = 7, min_seconds: float = 0.2, progress: bool = True) -> LatencyTable:
    """Time every layer (default: all quantizable ones) inside the running model, at float32
    and at each candidate, on ``batch``; see the module docstring.

    Configuration ``p`` puts every layer that takes ``p`` at ``p`` (float32 elsewhere). Each
    round runs every configuration (rotating order) for at least ``min_seconds`` with
    forward hooks timing each layer, then as long again without hooks for the whole-model
    time; the tables hold medians over rounds. Python's cyclic garbage collector is paused
    while timing (:func:`mixprec.timing.paused_garbage_collector`). The model is restored
    afterwards.
    """
    if rounds < 1:
        raise CalibrationError(f"rounds must be >= 1, got {rounds}")
    precisions = dynamic_candidates(candidates)
    order = list(dict(model.named_modules()))
    names = sorted(quantizable_names(model), key=order.index) if layers is None else list(layers)
    unknown = sorted(set(names) - quantizable_names(model))
    if unknown:
        raise PolicyError(f"{unknown[:3]} are not quantizable layers of this {type(model).__name__}")
    warn_unfolded(model, "measure_latency")
    originals = {name: model.get_submodule(name) for name in names}
    configurations: dict[str, dict[str, nn.Module]] = {"fp32": dict(originals)}
    for precision in precisions:
        configurations[precision.name] = {name: build(module, precision) if applicable(name, module, [precision])
                                          else module for name, module in originals.items()}
    samples: dict[str, dict[str, list]] = {label: {"layers": [], "model": []} for label in configurations}
    labels = list(configurations)
    try:
        with torch.no_grad(), paused_garbage_collector(), Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("layer latency", total=rounds * len(labels))
            calls = _calls_per_measurement(model, batch, min_seconds)
            for round_index in range(rounds):
                shift = round_index % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    _install(model, configurations[label])
                    clock = _LayerClock(model, names)
                    try:
                        for _ in range(calls):
                            run_batch(model, batch)
                    finally:
                        clock.remove()
                    if any(total == 0.0 for total in clock.totals.values()):
                        idle = [name for name, total in clock.totals.items() if total == 0.0]
                        raise CalibrationError(f"layers {idle[:3]} did not run on the batch, so their latency "
                                               "cannot be measured; leave them out (layers=)")
                    samples[label]["layers"].append({k: v / calls for k, v in clock.totals.items()})
                    start = time.perf_counter()
                    for _ in range(calls):
                        run_batch(model, batch)
                    samples[label]["model"].append((time.perf_counter() - start) / calls)
                    bar.advance(task)
    finally:
        _install(model, originals)
    medians = {label: {name: statistics.median(s[name] for s in samples[label]["layers"]) for name in names}
               for label in labels}
    model_s = {label: statistics.median(samples[label]["model"]) for label in labels}
    base_s = statistics.median(model_s[label] - sum(medians[label].values()) for label in labels)
    rows = [LatencyRow(name, label, medians[label][name]) for name in names for label in labels
            if label == "fp32" or configurations[label][name] is not originals[name]]
    return LatencyTable(base_s, model_s["fp32"], tuple(rows))


def _calls_per_measurement(model: nn.Module, batch: Any, min_seconds: float) -> int:
    run_batch(model, batch)  # warm up
    start = time.perf_counter()
    run_batch(model, batch)
    return max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
