"""``quantize(model, policy, calibration=...)``: swap layers for their quantized versions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mixprec import qat
from mixprec.accounting import model_bytes, modules_with_tensors, own_bytes
from mixprec.batchnorm import folded_conv, plan_merges, replace_module
from mixprec.errors import CalibrationError, ExportError, PolicyError
from mixprec.formats import QParams, all_finite
from mixprec.gptq import HessianAccumulator
from mixprec.heap import release_free_heap
from mixprec.nn.base import warn_slow_paths
from mixprec.nn.linear_int8 import STATIC_ACTIVATION
from mixprec.observers import OBSERVERS, make_observer
from mixprec.policy import LayerPlan, Policy, int8_conv_names
from mixprec.precision import build, has_integer_weights, in_features, rounds_to_integers
from mixprec.quant_report import LayerReport, QuantReport
from mixprec.tied_weights import share_tied_storage, sharing_note, tied_groups

WEIGHT_ROUNDINGS = ("nearest", "gptq")


def quantize(model: nn.Module, policy: Policy | str, calibration: Iterable[Any] | None = None,
             observer: str = "minmax", weight_rounding: str = "nearest", fold_batchnorm: bool = True) -> QuantReport:
    """Quantize ``model`` in place according to ``policy`` and report what each layer became.

    Args:
        model: any ``torch.nn.Module`` (Hugging Face models included); its ``nn.Linear``,
            GPT-2-style ``Conv1D``, ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` layers are
            replaced, everything else is kept in float32.
        policy: a :class:`Policy`, or a precision name applied to every layer.
        calibration: batches for ``int8-static`` layers and GPTQ. Each batch is passed to the model
            as ``model(batch)`` (a tensor), ``model(*batch)`` (tuple/list) or
            ``model(**batch)`` (mapping). Calibration runs on the float model.
        observer: range estimator for static activations: ``minmax``, ``moving_average``,
            ``percentile`` or ``mse``.
        weight_rounding: ``nearest`` (round each weight to its nearest code) or ``gptq``
            (GPTQ error compensation from the calibration inputs' second moments; applies
            to Linear layers with integer weights: int8, int8-static, int8-asym, int8-tensor, w8, w4).
        fold_batchnorm: fold each BatchNorm that only reads a quantized convolution's output into
            that convolution before quantizing it (see :mod:`mixprec.batchnorm`; the BatchNorm
            becomes ``nn.Identity`` and the report says so), and run each ``nn.ReLU`` module that
            only reads an ``int8`` / ``int8-static`` convolution's (folded) output in that
            convolution's epilogue (the ReLU becomes ``nn.Identity``; the kernel says so).
            False keeps them apart.

    Layers whose float weight is one tied tensor (a language model's head and its input embedding) hold one
    quantized tensor too when both store the same codes (e.g. both ``w8gN``, or both ``fp16``): the second layer's
    equal buffers are pointed at the first's, and the report says so.

    Every check (policy, applicability, calibration) runs before the first layer is
    replaced; layers are then replaced one at a time and quantize keeps no reference to a
    replaced float layer, so (when the caller holds none either) at most one layer's old
    and new storage exist together.
    """
    if isinstance(policy, str):
        policy = Policy(default=policy)
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a mixprec.Policy or a precision name, got {type(policy).__name__}")
    if observer not in OBSERVERS:
        raise CalibrationError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise PolicyError(f"unknown weight_rounding {weight_rounding!r}; choose one of {', '.join(WEIGHT_ROUNDINGS)}")
    if not isinstance(fold_batchnorm, bool):
        raise PolicyError(f"fold_batchnorm must be True or False, got {fold_batchnorm!r}")
    plans = policy.plan(model)
    if qat.release(model, plans):  # trained through the policy: quantize the trained float layers
        plans = policy.plan(model)
    fp32_bytes = model_bytes(model)
    before = {name: (type(module).__name__, own_bytes(module)) for name, module in modules_with_tensors(model)}
    static = [plan for plan in plans if plan.precision.is_static]
    gptq = [plan for plan in plans if weight_rounding == "gptq" and has_integer_weights(plan.module, plan.precision)]
    gptq_names = {plan.name for plan in gptq}
    input_qparams: dict[str, QParams] = {}
    hessians: dict[str, Tensor] = {}
    if static or gptq:
        if calibration is None:
            names = ", ".join(repr(p.name) for p in (static or gptq)[:4])
            why = "int8-static layers" if static else "GPTQ weight rounding for layers"
            raise CalibrationError(f"{why} ({names}) need calibration data: pass calibration=[batch, ...]")
        input_qparams, hessians = calibrate(model, static, gptq, calibration, observer)
    decided = {plan.name: (plan.precision.name, plan.rule, rounds_to_integers(plan.precision))
               for plan in plans}
    del static, gptq
    merges = plan_merges(model, {plan.name for plan in plans if plan.precision.family != "fp32"},
                         int8_conv_names(plans), fold_batchnorm)
    folds, relus, unfolded = merges.folds, merges.relus, merges.unfolded
    tied = tied_groups((plan.name, plan.module) for plan in plans)
    built = []
    with torch.no_grad():
        while plans:
            plan = plans.pop(0)
            name, precision, module = plan.name, plan.precision, plan.module
            del plan
            if precision.family != "fp32":
                if name in folds:  # the folded copy replaces the layer before the original's memory is needed again
                    module = folded_conv(module, model.get_submodule(folds[name]))
                    replace_module(model, name, module)
                    replace_module(model, folds[name], nn.Identity())
                new = build(module, precision, input_qparams.get(name), hessians.pop(name, None))
                if name in folds:
                    new.folded_batchnorm = folds[name]
                if name in relus:
                    new.fused_relu = relus[name]
                    replace_module(model, relus[name], nn.Identity())
                replace_module(model, name, new)
                built.append((name, new))
            del module  # the float layer is freed here unless the caller holds it
    warn_slow_paths(built)
    sharing = share_tied_storage(model, tied)
    if built:
        guard_save_pretrained(model)
    rows = []
    modules = dict(model.named_modules())
    folded_into = merges.folded_into
    for name, (kind, bytes_before) in before.items():
        module = modules[name]
        precision, rule, integer_weights = decided.get(name, ("fp32", "-", False))
        kernel = getattr(module, "kernel", "float32 (unchanged)" if name in decided else "unchanged")
        if name in folds:
            kernel = f"{kernel}; BatchNorm {folds[name]!r} folded in"
        elif name in folded_into:
            precision, rule, kernel = "folded", "fold_batchnorm", f"folded into {folded_into[name]!r}"
        elif name in unfolded:
            kernel = f"float32, not folded: {unfolded[name]}"
        if name in sharing:
            kernel = sharing_note(kernel, sharing[name])
        rows.append(LayerReport(
            name=name,
            module_type=kind,
            precision=precision,
            kernel=kernel,
            rule=rule,
            bytes_before=bytes_before,
            bytes_after=own_bytes(module),
            overflow_count=getattr(module, "overflow_count", 0),
            weight_rounding=("gptq" if name in gptq_names else "nearest") if integer_weights else "-",
            slow_path=getattr(module, "slow_path", None) or "",
        ))
    report = QuantReport(tuple(rows), model_bytes(model), fp32_bytes)
    release_free_heap()  # the float weights and every temporary freed above (see mixprec.heap)
    return report


def calibrate(
    model: nn.Module, static: list[LayerPlan], gptq: list[LayerPlan], calibration: Iterable[Any], observer: str
) -> tuple[dict[str, QParams], dict[str, Tensor]]:
    """One pass over the calibration batches on the float model: activation ranges of the
    ``static`` layers' inputs and input second moments (Hessians) of the ``gptq`` layers."""
    observers = {plan.name: make_observer(observer, STATIC_ACTIVATION) for plan in static}
    accumulators = {plan.name: HessianAccumulator(in_features(plan.module)) for plan in gptq}

    def hook_for(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if name in observers:
                observers[name].observe(args[0])
            if name in accumulators:
                accumulators[name].observe(args[0])
        return hook

    layers = {plan.name: plan.module for plan in static + gptq}
    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    batches = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(calibration):
                _check_finite(batch, index)
                run_batch(model, batch, index)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise CalibrationError("calibration data is empty; pass at least one batch")
    silent = [name for name, obs in observers.items() if obs.batches == 0]
    silent += [name for name, acc in accumulators.items() if acc.rows == 0]
    if silent:
        raise CalibrationError(f"calibration never reached layers {sorted(set(silent))}; check the batches run them")
    return ({name: obs.qparams() for name, obs in observers.items()},
            {name: acc.value() for name, acc in accumulators.items()})


def run_batch(model: nn.Module, batch: Any, index: int = 0) -> Any:
    """``model(batch)`` for a tensor, ``model(*batch)`` for a tuple/list, ``model(**batch)`` for a mapping."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise CalibrationError(f"batch {index} is a {type(batch).__name__}; use a tensor, tuple or dict")


def _check_finite(batch: Any, index: int) -> None:
    tensors = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for tensor in tensors:
        if isinstance(tensor, Tensor) and not all_finite(tensor):
            raise CalibrationError(
                f"calibration batch {index} holds NaN or Inf values; clean it or leave it out"
            )


def guard_save_pretrained(model: nn.Module) -> None:
    """Make a quantized transformers model's ``save_pretrained`` (and so ``push_to_hub``) refuse:
    its folder would reload as float weights with stray scales, silently wrong."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return

    def save_pretrained(*_args: object, **_kwargs: object) -> None:
        raise ExportError(
            "this model holds mixprec-quantized layers, which transformers' save_pretrained would write as a folder "
            "that reloads wrong; use mixprec.save(model, 'model.safetensors') (reload with mixprec.load) or "
            "mixprec.export(model, folder, format='compressed-tensors') (transformers and vLLM read it); or load with "
            "from_pretrained(..., quantization_config=MixprecConfig(policy)) from mixprec.export.hf_quantizer, "
            "whose save_pretrained round-trips"
        )

    model.save_pretrained = save_pretrained
