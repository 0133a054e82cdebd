"""Per-layer sensitivity: the cost of quantizing one layer alone to one precision.

Forward metrics (no gradients): the layer alone is replaced by its quantized module (the
same one :func:`mixprec.quantize` builds), the model runs on the data, and the output is
compared with the float model's; the original layer is put back after each measurement,
so the model ends as it started.

- ``"sqnr"``: cost = noise-to-signal power ratio ``sum (y_q - y)^2 / sum y^2`` over all
  outputs (lower is better); ``value`` is the SQNR in dB, ``-10 log10(cost)``;
- ``"kl"``: cost = mean over output rows of ``KL(softmax(y) || softmax(y_q))`` along the
  last dimension, in nats (for logits);
- a callable ``metric(reference_outputs, outputs) -> float`` (lower is better).

Curvature metrics (need ``loss(model, batch) -> scalar``; see :mod:`.curvature`), with
``dW = W_q - W`` the weight perturbation (``W_q`` the dequantized weight the quantized
module multiplies by; activation quantization is not part of it):

- ``"hessian"`` (HAWQ-V2): cost = ``max(Tr(H), 0) / n * ||dW||^2`` with ``Tr(H)`` the
  Hutchinson trace of the layer's ``n``-element weight; ``value`` is ``Tr(H) / n``
  (a negative estimate means noise or negative curvature and costs zero);
- ``"fisher"``: cost = ``1/2 sum F * dW^2`` with ``F`` the diagonal empirical Fisher;
  ``value`` is the mean of ``F``.
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
from mixprec.analysis.curvature import Loss, fisher_diagonals, hutchinson_traces
from mixprec.batchnorm import warn_unfolded
from mixprec.errors import CalibrationError, PolicyError
from mixprec.io_utils import write_text_atomic
from mixprec.policy import quantizable_names
from mixprec.precision import (
    Precision,
    as_linear,
    build,
    build_empty,
    check_applicable,
    is_gpt2_conv1d,
    parse_precision,
)
from mixprec.quantize import replace_module, run_batch

FORWARD_METRICS = ("sqnr", "kl")
CURVATURE_METRICS = ("hessian", "fisher")
METRICS = FORWARD_METRICS + CURVATURE_METRICS
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


def mean_kl_divergence(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    """KL(softmax(reference) || softmax(outputs)) in nats, over the last axis in float64, averaged
    over every row of every batch (the ``"kl"`` sensitivity metric)."""
    total, rows = 0.0, 0
    for r, o in zip(reference, outputs):
        log_p, log_q = F.log_softmax(r.double(), dim=-1), F.log_softmax(o.double(), dim=-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        rows += r.numel() // r.shape[-1]
    return total / rows


def sensitivity(model: nn.Module, data: Iterable[Any], candidates: Sequence[str], metric: str | Metric = "sqnr",
                forward: Callable[[nn.Module, Any], Tensor] | None = None, loss: Loss | None = None,
                samples: int = 4, seed: int = 0, progress: bool = True) -> SensitivityTable:
    """Cost of quantizing each layer alone to each candidate precision (see module docstring).

    Args:
        data: batches, each given to the model as :func:`mixprec.quantize` calibration is.
        candidates: precision names; ``fp32`` is allowed (cost 0).
        metric: ``"sqnr"``, ``"kl"``, ``"hessian"``, ``"fisher"`` or a callable.
        forward: ``(model, batch) -> Tensor`` for forward metrics (default: the output
            tensor, ``logits`` or ``last_hidden_state``).
        loss: ``(model, batch) -> scalar Tensor``, required by the curvature metrics.
        samples: Hutchinson probe vectors per batch (``"hessian"`` only).
        seed: seed of the probe vectors.

    Pairs where a candidate does not apply to a layer (e.g. ``int8`` with an input width
    beyond the int32 proof, ``w4`` groups that do not divide it) are left out; a candidate
    that applies to no layer at all is an error.
    """
    batches = list(data)
    if not batches:
        raise CalibrationError("sensitivity needs data: pass at least one batch")
    if isinstance(metric, str) and metric not in METRICS:
        raise PolicyError(f"unknown metric {metric!r}; choose {', '.join(METRICS)} or pass a callable")
    if metric in CURVATURE_METRICS and loss is None:
        raise CalibrationError(f"metric {metric!r} needs loss=(model, batch) -> scalar tensor")
    pairs = _applicable_pairs(model, candidates)
    warn_unfolded(model, "sensitivity")
    if metric in CURVATURE_METRICS:
        rows = _curvature_rows(model, batches, pairs, str(metric), loss, samples, seed, progress)  # type: ignore[arg-type]
    else:
        rows = _forward_rows(model, batches, pairs, metric, forward or default_forward, progress)
    return SensitivityTable(tuple(rows))


def dynamic_candidates(candidates: Sequence[str]) -> list[Precision]:
    """Parse candidate precision names, refusing an empty list and static ones (which need
    calibrated activations)."""
    if not candidates or isinstance(candidates, str):
        raise PolicyError(f"needs a list of candidate precisions, got {candidates!r}")
    precisions = [parse_precision(name) for name in candidates]
    static = [p.name for p in precisions if p.is_static]
    if static:
        raise PolicyError(f"{static} need calibrated activations; take dynamic and weight-only "
                          "precisions (int8, w8, w4, bf16, fp16, ...)")
    return precisions


def applicable(name: str, module: nn.Module, precisions: Sequence[Precision]) -> list[Precision]:
    """The candidates that apply to one layer (see :func:`mixprec.precision.check_applicable`)."""
    chosen = []
    for precision in precisions:
        try:
            check_applicable(name, module, precision)
        except PolicyError:
            continue
        chosen.append(precision)
    return chosen


def _applicable_pairs(model: nn.Module, candidates: Sequence[str]) -> list[tuple[str, nn.Module, Precision]]:
    precisions = dynamic_candidates(candidates)
    names = sorted(quantizable_names(model), key=list(dict(model.named_modules())).index)
    pairs = [(name, model.get_submodule(name), precision) for name in names
             for precision in applicable(name, model.get_submodule(name), precisions)]
    unused = sorted({p.name for p in precisions} - {p.name for _, _, p in pairs})
    if unused:
        raise PolicyError(f"candidates {unused} apply to no layer of this {type(model).__name__}")
    return pairs


def _row(name: str, module: nn.Module, precision: Precision, metric: str, cost: float, value: float) -> SensitivityRow:
    if math.isnan(cost) or math.isnan(value):
        raise CalibrationError(f"the metric {metric!r} gave NaN for layer {name!r} at {precision.name!r}")
    return SensitivityRow(name, type(module).__name__, precision.name, metric, cost, value,
                          own_bytes(module), own_bytes(build_empty(module, precision)))


def _forward_rows(model: nn.Module, batches: list[Any], pairs: list[tuple[str, nn.Module, Precision]],
                  metric: str | Metric, run: Callable[[nn.Module, Any], Tensor],
                  progress: bool) -> list[SensitivityRow]:
    cost_of: Metric = {"sqnr": _sqnr_cost, "kl": mean_kl_divergence}[metric] if isinstance(metric, str) else metric
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    rows = []
    with torch.no_grad():
        reference = [run(model, batch).detach() for batch in batches]
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
                value = -10.0 * math.log10(cost) if metric_name == "sqnr" and cost > 0 else cost
                rows.append(_row(name, module, precision, metric_name, cost, value))
                bar.advance(task)
    return rows


def weight_perturbation(module: nn.Module, precision: Precision) -> Tensor:
    """``W_q - W`` in float32, ``nn.Linear``/``nn.Embedding`` layout (zero for ``fp32``)."""
    weight = as_linear(module).weight.detach().to(torch.float32)
    if precision.family == "fp32":
        return torch.zeros_like(weight)
    with torch.no_grad():
        return build(module, precision).dequantized_weight() - weight


def _curvature_rows(model: nn.Module, batches: list[Any], pairs: list[tuple[str, nn.Module, Precision]],
                    metric: str, loss: Loss, samples: int, seed: int, progress: bool) -> list[SensitivityRow]:
    layers = dict.fromkeys(name for name, _, _ in pairs)
    weights = {name: model.get_submodule(name).weight for name in layers}
    if metric == "hessian":
        traces = hutchinson_traces(model, batches, loss, weights, samples, seed, progress)
        curvature = {name: traces[name] / weights[name].numel() for name in layers}
    else:
        fisher = fisher_diagonals(model, batches, loss, weights, progress)
        fisher = {name: f.t() if is_gpt2_conv1d(model.get_submodule(name)) else f for name, f in fisher.items()}
        curvature = {name: float(f.mean()) for name, f in fisher.items()}
    rows = []
    for name, module, precision in pairs:
        delta = weight_perturbation(module, precision)
        if metric == "hessian":
            cost = max(curvature[name], 0.0) * float(delta.double().pow(2).sum())
        else:
            cost = 0.5 * float((fisher[name].double() * delta.double().pow(2)).sum())
        rows.append(_row(name, module, precision, metric, cost, curvature[name]))
    return rows
