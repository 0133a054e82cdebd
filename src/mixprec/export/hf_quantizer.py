"""transformers integration: ``from_pretrained(..., quantization_config=MixprecConfig(policy))``.

Importing this module registers the quantization method ``"mixprec"`` with transformers:

- Loading a float checkpoint with ``quantization_config=MixprecConfig(policy=...)`` quantizes
  each layer the policy quantizes as its weight arrives from the checkpoint (the model is
  built on the meta device first, so at most one layer's float weight exists at a time),
  with mixprec's round-to-nearest rounding: the same codes :func:`mixprec.quantize` gives.
- ``save_pretrained`` writes the quantized tensors (mixprec's own names and layouts) and the
  policy into ``config.json``; ``from_pretrained`` of that folder (after ``import
  mixprec.export.hf_quantizer``) rebuilds the same layers and loads them: bit-identical outputs.

A head tied to its input embedding (``tie_word_embeddings``) is quantized with it when both take
one precision whose codes the head can take from the embedding whole (``w8gN``, ``bf16``,
``fp16``): the head holds the embedding's quantized tensors (one copy, written once by
``save_pretrained`` and shared again on loading).

The model computes in float32 (``dtype`` is forced to it). Refused, before anything loads:
precisions that need calibration (``int8-static``; GPTQ is not offered here), any other
quantization of a tied embedding / LM head (transformers re-ties them after loading), and a
policy that does not fit the model (unused rules, wrong precisions), with the policy's own
messages.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from mixprec.accounting import own_bytes
from mixprec.errors import CheckpointError, PolicyError
from mixprec.heap import release_free_heap
from mixprec.kernels.w4a8_linear import blocked_layout_applies
from mixprec.nn import HalfLinear, Int8DynamicLinear, Int8PackedLinear, QuantizedModule, W4A8Linear
from mixprec.nn.base import warn_slow_paths
from mixprec.nn.linear_int8 import int8_dynamic_class
from mixprec.policy import Policy
from mixprec.precision import as_linear, build, build_empty
from mixprec.tied_weights import saved_by_sharing

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as exc:  # pragma: no cover - the hf extra is missing
    raise ImportError("mixprec's transformers integration needs transformers: pip install 'mixprec[hf]'") from exc

METHOD = "mixprec"


def _policy_from(value: object) -> Policy:
    if isinstance(value, Policy):
        return value
    if isinstance(value, str):
        return Policy(default=value)
    if isinstance(value, dict):
        return Policy.from_dict(value)
    raise PolicyError("MixprecConfig(policy=...) takes a mixprec.Policy, a precision name or a policy dict "
                      "({'default': ..., 'rules': [{'pattern': ..., 'precision': ...}]}), "
                      f"got {type(value).__name__}")


class MixprecConfig(QuantizationConfigMixin):
    """A mixprec policy as a transformers quantization config (``quant_method="mixprec"``)."""

    def __init__(self, policy: Policy | str | dict | None = None, **kwargs: Any) -> None:
        if policy is None:
            raise PolicyError("MixprecConfig needs a policy: MixprecConfig(policy=mixprec.Policy([...]))")
        self.quant_method = METHOD
        self.policy = _policy_from(policy)
        if "int8-static" in [self.policy.default, *(rule.precision for rule in self.policy.rules)]:
            raise PolicyError("int8-static needs calibration data, which from_pretrained cannot pass: "
                              "load the float model and call mixprec.quantize(model, policy, calibration=...)")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "policy": self.policy.to_dict()}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any) -> MixprecConfig | tuple[MixprecConfig, dict]:
        config = cls(policy=config_dict.get("policy"))
        return (config, kwargs) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:  # noqa: ARG002
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class _QuantizeOnLoad(ConversionOps):
    """Turns one arriving float weight into the layer's quantized module, in place in the model."""

    def __init__(self, quantizer: MixprecQuantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        name = full_layer_name.rsplit(".", 1)[0]
        self.quantizer.quantize_layer(model, name, value.detach().to(torch.float32))
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class MixprecQuantizer(HfQuantizer):
    """transformers' side of :class:`MixprecConfig` (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: MixprecConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.plans: dict[str, Any] = {}
        self.tied_head: tuple[str, str] | None = None  # (head, embedding) sharing the embedding's quantized storage

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and set(map(str, device_map.values())) - {"cpu"}:
            raise PolicyError("mixprec's quantized layers run on the CPU; load without a device_map (or all 'cpu')")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def get_new_dtype(self, converter: object, param: object, dtype: torch.dtype | None) -> torch.dtype | None:
        return None if self.pre_quantized else dtype  # codes, scales and half weights load as stored

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        plans = self.quantization_config.policy.plan(model, check_values=False)
        self.plans = {plan.name: plan for plan in plans if plan.precision.family != "fp32"}
        tied = self._tied_head(model)
        if tied:  # the head's weight never arrives: it takes the embedding's quantized storage after loading
            head, embedding, head_empty = tied
            self.tied_head = head, embedding
            getattr(model, "all_tied_weights_keys", {}).pop(f"{head}.weight", None)  # transformers ties Parameters
            ignored = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())  # not missing: shared
            model._keys_to_ignore_on_load_missing = ignored | {rf"^{re.escape(head)}\.weight(_scale)?$"}
            if not self.pre_quantized:
                _replace(model, head, head_empty)
        if self.pre_quantized:
            for name, plan in self.plans.items():
                if plan.precision.family == "int8" and not isinstance(plan.module, nn.Embedding):
                    # the dense codes load as stored; packed for oneDNN after loading where that is faster
                    linear = as_linear(plan.module)
                    empty = Int8DynamicLinear(linear.in_features, linear.out_features, linear.bias is not None)
                else:
                    empty = build_empty(plan.module, plan.precision)
                    if isinstance(empty, W4A8Linear) and empty.blocked:  # the packed codes load as stored
                        empty = empty.relaid(blocked=False)
                _replace(model, name, empty)

    def _tied_head(self, model: nn.Module) -> tuple[str, str, nn.Module] | None:
        """``(head, embedding, the head's empty quantized module)`` when they share one weight (tie_word_embeddings)
        and both are quantized to one precision whose storage the head can take from the embedding whole (w8gN,
        bf16, fp16; no bias); None when neither is quantized; refuses any other tie (transformers re-ties them after
        loading)."""
        if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return None
        names = {module: name for name, module in model.named_modules()}
        embedding, head = (names.get(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()))
        quantized = [name for name in (embedding, head) if name in self.plans]
        if not quantized:
            return None
        if embedding in self.plans and head in self.plans and \
                self.plans[head].precision.name == self.plans[embedding].precision.name:
            head_empty, table_empty = (build_empty(self.plans[name].module, self.plans[name].precision)
                                       for name in (head, embedding))
            if saved_by_sharing([head_empty, table_empty]) == own_bytes(head_empty):
                return head, embedding, head_empty
        holders, kept = f"{embedding!r} and {head!r}", ", ".join(map(repr, quantized))
        raise PolicyError(f"{holders} share one weight (tie_word_embeddings) and transformers re-ties them after "
                          f"loading, so here both take one precision whose codes they share (w8gN, bf16, fp16) or "
                          f"both stay fp32 ({kept} quantized otherwise); or quantize the loaded model with "
                          "mixprec.quantize")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        layer, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor == "weight" and layer in self.plans

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    def quantize_layer(self, model: nn.Module, name: str, weight: torch.Tensor) -> None:
        """Build the quantized module of layer ``name`` from its arriving float ``weight``; a bias
        loaded before it is kept, one arriving after it lands in the quantized module."""
        plan = self.plans[name]
        current = model.get_submodule(name)
        bias = getattr(as_linear(current), "bias", None) if not isinstance(current, nn.Embedding) else None
        if isinstance(current, nn.Embedding):
            float_layer: nn.Module = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=current.padding_idx,
                                                  _weight=weight)
        else:
            float_layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            float_layer.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                real = bias.device.type != "meta"
                float_layer.bias = nn.Parameter(bias.detach().float() if real else torch.zeros(weight.shape[0]),
                                                requires_grad=False)
        with torch.no_grad():
            quantized = build(float_layer, plan.precision)
        quantized._is_hf_initialized = True
        _replace(model, name, quantized)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.tied_head:  # the head's buffers: the embedding's own tensors (codes and scales), not copies
            head, table = (model.get_submodule(name) for name in self.tied_head)
            for key in [key for key, _ in head.named_buffers(recurse=False)]:
                setattr(head, key, getattr(table, key))
        if self.pre_quantized:
            self._refuse_missing(model)
        for name, module in list(model.named_modules()):
            if type(module) is Int8DynamicLinear and int8_dynamic_class(module.in_features, module.out_features) \
                    is Int8PackedLinear:
                packed = Int8PackedLinear(module.in_features, module.out_features, module.bias is not None)
                packed._store_codes(module.weight)
                packed.weight_scale.copy_(module.weight_scale)
                if module.bias is not None:
                    packed.bias.copy_(module.bias)
                _replace(model, name, packed)
            elif isinstance(module, W4A8Linear) and not module.blocked and blocked_layout_applies(module.group_size):
                _replace(model, name, module.relaid(blocked=True))
        for module in model.modules():  # a bias that arrived after its weight came in the model's dtype
            bias = getattr(module, "bias", None)
            if isinstance(module, QuantizedModule) and bias is not None:
                wanted = module.weight.dtype if isinstance(module, HalfLinear) else torch.float32
                module.bias = bias.detach().to(wanted)
        warn_slow_paths((name, m) for name, m in model.named_modules() if isinstance(m, QuantizedModule))
        release_free_heap()  # the float weights transformers read and freed (see mixprec.heap)

    def _refuse_missing(self, model: nn.Module) -> None:
        """A mixprec folder must hold every tensor of every quantized layer: transformers fills a
        missing one with fresh values (and only logs it), which for codes and scales is garbage."""
        missing = [f"{name}.{key}" for name in self.plans for key, tensor in model.get_submodule(name)._buffers.items()
                   if tensor is not None and not getattr(tensor, "_is_hf_initialized", False)]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise CheckpointError(f"the folder lacks {len(missing)} tensor(s) of mixprec-quantized layers ({shown}): "
                                  "it was not written by save_pretrained of a model loaded with this MixprecConfig, "
                                  "or it is damaged")

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self) -> bool:
        return True


if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(METHOD)(MixprecConfig)
if METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(METHOD)(MixprecQuantizer)
