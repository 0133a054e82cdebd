"""Forward sensitivity: quantize one layer at a time and measure how the model's output moves.

For every quantizable layer and every candidate precision, the layer alone is replaced by
its quantized module (the same one :func:`mixprec.quantize` builds), the model runs on
the data, and the output is compared with the float model's:

- ``"sqnr"``: cost = noise-to-signal power ratio ``sum (y_q - y)^2 / sum y^2`` over all
  outputs (lower is better); ``value`` is the SQNR in dB, ``-10 log10(cost)``;
- ``"kl"``: cost = mean over output rows of ``KL(softmax(y) || softmax(y_q))`` along the
  last dimension, in nats (for logits);
- a callable ``metric(reference_outputs, outputs) -> float`` (lower is better).

The original layer is put back after each measurement, so the model ends as it started.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

from mixprec.accounting import own_bytes
from mixprec.errors import CalibrationError, PolicyError
from mixprec.io_utils import write_text_atomic
from mixprec.policy import quantizable_names
from mixprec.precision import build, build_empty, check_applicable, parse_precision
from mixprec.quantize import replace_module, run_batch

METRICS = ("sqnr", "kl")
Metric = Callable[[Sequence[Tensor], Sequence[Tensor]], float]


@dataclass(frozen=True)
class SensitivityRow:
    """One (layer, precision) measurement: ``cost`` (lower is better) and the metric's value."""

    layer: str
    module_type: str
    precision: str
    metric: str
    cost: float
    value: float
    bytes_fp32: int
    bytes_after: int


@dataclass(frozen=True)
class SensitivityTable:
    rows: tuple[SensitivityRow, ...]

    def cost(self, layer: str, precision: str) -> float:
        for row in self.rows:
            if row.layer == layer and row.precision == precision:
                return row.cost
        raise KeyError(f"no measurement for layer {layer!r} at {precision!r}")

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """JSON text; written atomically to ``path`` if given (a cache :meth:`from_json` reads)."""
        text = json.dumps({"rows": [asdict(row) for row in self.rows]}, indent=2) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(tuple(SensitivityRow(**row) for row in data["rows"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CalibrationError(f"{str(path)!r} is not a sensitivity table: {exc}") from None

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """CSV text, one row per measurement; written atomically to ``path`` if given."""
        header = ",".join(SensitivityRow.__dataclass_fields__)
        lines = [header] + [",".join(str(v) for v in asdict(row).values()) for row in self.rows]
        text = "\n".join(lines) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """Run ``batch`` like :func:`mixprec.quantize` calibration does and take the output tensor
    (``logits`` or ``last_hidden_state`` of ``transformers`` outputs)."""
    out = run_batch(model, batch)
    if isinstance(out, Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, name, None), Tensor):
            return getattr(out, name)
    raise CalibrationError(f"the model returned a {type(out).__name__}; pass forward=(model, batch) -> Tensor")


def _sqnr_cost(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    noise = sum(float((o.double() - r.double()).pow(2).sum()) for r, o in zip(reference, outputs))
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    return noise / signal if signal > 0 else float("inf")


def _kl_cost(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    total, rows = 0.0, 0
    for r, o in zip(reference, outputs):
        log_p, log_q = F.log_softmax(r.double(), dim=-1), F.log_softmax(o.double(), dim=-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        rows += r.numel() // r.shape[-1]
    return total / rows


def sensitivity(model: nn.Module, data: Iterable[Any], candidates: Sequence[str], metric: str | Metric = "sqnr",
                forward: Callable[[nn.Module, Any], Tensor] | None = None, progress: bool = True) -> SensitivityTable:
    """Cost of quantizing each layer alone to each candidate precision (see module docstring).

    Pairs where a candidate does not apply to a layer (e.g. ``int8`` with an input width
    beyond the int32 proof, ``w4`` groups that do not divide it) are left out; a candidate
    that applies to no layer at all is an error.
    """
    batches = list(data)
    if not batches:
        raise CalibrationError("sensitivity needs data: pass at least one batch")
    if not candidates:
        raise PolicyError("sensitivity needs at least one candidate precision")
    precisions = [parse_precision(name) for name in candidates]
    static = [p.name for p in precisions if p.is_static]
    if static:
        raise PolicyError(f"{static} need calibrated activations; sensitivity takes dynamic and weight-only "
                          "precisions (int8, w8, w4, bf16, fp16, ...)")
    if isinstance(metric, str) and metric not in METRICS:
        raise PolicyError(f"unknown metric {metric!r}; choose {', '.join(METRICS)} or pass a callable")
    cost_of: Metric = {"sqnr": _sqnr_cost, "kl": _kl_cost}[metric] if isinstance(metric, str) else metric
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    run = forward or default_forward
    names = sorted(quantizable_names(model), key=list(dict(model.named_modules())).index)
    pairs = []
    for name in names:
        module = model.get_submodule(name)
        for precision in precisions:
            try:
                check_applicable(name, module, precision)
            except PolicyError:
                continue
            pairs.append((name, module, precision))
    unused = sorted({p.name for p in precisions} - {p.name for _, _, p in pairs})
    if unused:
        raise PolicyError(f"candidates {unused} apply to no layer of this {type(model).__name__}")
    with torch.no_grad():
        reference = [run(model, batch).detach() for batch in batches]
        rows = []
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("sensitivity", total=len(pairs))
            for name, module, precision in pairs:
                quantized = build(module, precision)
                replace_module(model, name, quantized)
                try:
                    outputs = [run(model, batch).detach() for batch in batches]
                finally:
                    replace_module(model, name, module)
                cost = float(cost_of(reference, outputs))
                if math.isnan(cost):
                    raise CalibrationError(f"the metric returned NaN for layer {name!r} at {precision.name!r}")
                value = -10.0 * math.log10(cost) if metric_name == "sqnr" and cost > 0 else cost
                rows.append(SensitivityRow(name, type(module).__name__, precision.name, metric_name, cost, value,
                                           own_bytes(module), own_bytes(build_empty(module, precision))))
                bar.advance(task)
    return SensitivityTable(tuple(rows))
