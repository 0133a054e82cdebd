"""``quantize(model, policy, calibration=...)``: swap layers for their quantized versions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mixprec.accounting import model_bytes, modules_with_tensors, own_bytes
from mixprec.errors import CalibrationError, PolicyError
from mixprec.formats import QParams
from mixprec.nn.linear_int8 import STATIC_ACTIVATION
from mixprec.observers import OBSERVERS, make_observer
from mixprec.policy import LayerPlan, Policy
from mixprec.precision import build
from mixprec.quant_report import LayerReport, QuantReport


def quantize(model: nn.Module, policy: Policy | str, calibration: Iterable[Any] | None = None,
             observer: str = "minmax") -> QuantReport:
    """Quantize ``model`` in place according to ``policy`` and report what each layer became.

    Args:
        model: any ``torch.nn.Module``; its ``nn.Linear`` and ``nn.Embedding`` layers are
            replaced, everything else is kept in float32.
        policy: a :class:`Policy`, or a precision name applied to every layer.
        calibration: batches for ``int8-static`` layers. Each batch is passed to the model
            as ``model(batch)`` (a tensor), ``model(*batch)`` (tuple/list) or
            ``model(**batch)`` (mapping). Calibration runs on the float model.
        observer: range estimator for static activations: ``minmax``, ``moving_average``,
            ``percentile`` or ``mse``.

    Every check (policy, applicability, calibration) runs before the first layer is
    replaced; layers are then replaced one at a time, so at most one layer's old and new
    storage exist together.
    """
    if isinstance(policy, str):
        policy = Policy(default=policy)
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a mixprec.Policy or a precision name, got {type(policy).__name__}")
    if observer not in OBSERVERS:
        raise CalibrationError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    plans = policy.plan(model)
    fp32_bytes = model_bytes(model)
    before = {name: (type(module).__name__, own_bytes(module)) for name, module in modules_with_tensors(model)}
    static = [plan for plan in plans if plan.precision.is_static]
    input_qparams: dict[str, QParams] = {}
    if static:
        if calibration is None:
            names = ", ".join(repr(p.name) for p in static[:4])
            raise CalibrationError(
                f"int8-static layers ({names}) need calibration data: pass calibration=[batch, ...]"
            )
        input_qparams = calibrate(model, static, calibration, observer)
    decided = {plan.name: plan for plan in plans}
    with torch.no_grad():
        for plan in plans:
            if plan.precision.family != "fp32":
                _replace(model, plan.name, build(plan.module, plan.precision, input_qparams.get(plan.name)))
    rows = []
    modules = dict(model.named_modules())
    for name, (kind, bytes_before) in before.items():
        module = modules[name]
        plan = decided.get(name)
        rows.append(LayerReport(
            name=name,
            module_type=kind,
            precision=plan.precision.name if plan else "fp32",
            kernel=getattr(module, "kernel", "float32 (unchanged)" if plan else "unchanged"),
            rule=plan.rule if plan else "-",
            bytes_before=bytes_before,
            bytes_after=own_bytes(module),
            overflow_count=getattr(module, "overflow_count", 0),
        ))
    return QuantReport(tuple(rows), model_bytes(model), fp32_bytes)


def calibrate(
    model: nn.Module, plans: list[LayerPlan], calibration: Iterable[Any], observer: str
) -> dict[str, QParams]:
    """Observe the inputs of the given layers over the calibration batches."""
    observers = {plan.name: make_observer(observer, STATIC_ACTIVATION) for plan in plans}

    def hook_for(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            observers[name].observe(args[0])
        return hook

    handles = [plan.module.register_forward_pre_hook(hook_for(plan.name)) for plan in plans]
    batches = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(calibration):
                _check_finite(batch, index)
                if isinstance(batch, Tensor):
                    model(batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    raise CalibrationError(
                        f"calibration batch {index} is a {type(batch).__name__}; use a tensor, tuple or dict"
                    )
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise CalibrationError("calibration data is empty; pass at least one batch")
    silent = [name for name, obs in observers.items() if obs.batches == 0]
    if silent:
        raise CalibrationError(f"calibration never reached layers {silent}; check the batches run them")
    return {name: obs.qparams() for name, obs in observers.items()}


def _check_finite(batch: Any, index: int) -> None:
    tensors = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CalibrationError(
                f"calibration batch {index} holds NaN or Inf values; clean it or leave it out"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
