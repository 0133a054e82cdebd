"""Saving and loading quantized models: safetensors plus JSON metadata, never pickle.

The file is one ``.safetensors`` file. Its header metadata holds, under the key
``"mixprec"``, a JSON object ``{"format": "mixprec", "version": 1, "layers": {name:
precision}, "aliases": {key: canonical key}, "folded": {batchnorm: convolution}, "fused_relu":
{relu: convolution}}`` (the BatchNorms that :func:`mixprec.quantize` folded into a convolution
and the ReLU modules it fused into one; both are ``nn.Identity`` in the quantized model).
:func:`load` rebuilds the quantized layers on a freshly built float model of the same
architecture, validates every tensor's name, shape and dtype and every scale before it
changes anything, then swaps them in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mixprec.accounting import model_bytes, modules_with_tensors, own_bytes
from mixprec.batchnorm import with_bias_template
from mixprec.errors import CheckpointError, MixprecError
from mixprec.formats import all_finite
from mixprec.heap import release_free_heap
from mixprec.io_utils import atomic_path
from mixprec.nn import QuantizedModule
from mixprec.nn.base import warn_slow_paths
from mixprec.nn.conv_layout import is_conv
from mixprec.precision import build_empty, check_applicable, parse_precision
from mixprec.quant_report import LayerReport, QuantReport
from mixprec.quantize import guard_save_pretrained
from mixprec.tied_weights import share_tied_storage, sharing_note, tied_groups

FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s tensors and its layers' precisions to ``path`` (atomically)."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"save takes a torch.nn.Module, got {type(model).__name__}")
    layers = {name: module.precision for name, module in model.named_modules() if isinstance(module, QuantizedModule)}
    folded = {module.folded_batchnorm: name for name, module in model.named_modules()
              if getattr(module, "folded_batchnorm", None)}
    fused = {module.fused_relu: name for name, module in model.named_modules() if getattr(module, "fused_relu", None)}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in model.state_dict().items():
        if tensor.device.type != "cpu":
            raise CheckpointError(f"tensor {key!r} is on {tensor.device}; move the model to the CPU before saving")
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = tensor.contiguous()
    metadata = {"format": "mixprec", "version": FORMAT_VERSION, "layers": layers, "aliases": aliases,
                "folded": folded, "fused_relu": fused}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"mixprec": json.dumps(metadata)})


def _read_metadata(path: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str],
                                        dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("mixprec")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    if raw is None:
        raise CheckpointError(f"{str(path)!r} has no mixprec metadata; was it written by mixprec.save?")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path)!r} has corrupt mixprec metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != "mixprec" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has metadata format/version {meta.get('format')!r}/{meta.get('version')!r}; "
            f"this mixprec reads mixprec/{FORMAT_VERSION}"
        )
    layers, aliases = meta.get("layers"), meta.get("aliases", {})
    folded, fused = meta.get("folded", {}), meta.get("fused_relu", {})
    if not all(isinstance(table, dict) for table in (layers, aliases, folded, fused)):
        raise CheckpointError(f"{str(path)!r} metadata lacks its 'layers' table")
    return layers, aliases, folded, fused, tensors


def load(model: nn.Module, path: str | os.PathLike[str]) -> QuantReport:
    """Load a checkpoint written by :func:`save` into a freshly built float ``model``.

    Raises CheckpointError, leaving ``model`` untouched, if anything does not fit.
    """
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"load takes a torch.nn.Module, got {type(model).__name__}")
    already = [name for name, m in model.named_modules() if isinstance(m, QuantizedModule)]
    if already:
        raise CheckpointError(f"load needs a float model, but {already[0]!r} is already quantized")
    layers, aliases, folded, fused, stored = _read_metadata(Path(path))
    fp32_bytes = model_bytes(model)
    modules = dict(model.named_modules())
    tied = tied_groups(modules.items())
    folds = _merged_into_convs(folded, (nn.BatchNorm1d, nn.BatchNorm2d), "folded BatchNorm", layers, modules)
    relus = _merged_into_convs(fused, (nn.ReLU,), "fused ReLU", layers, modules)
    replacements: dict[str, nn.Module] = {}
    for name, precision_name in layers.items():
        if name not in modules:
            raise CheckpointError(f"checkpoint has quantized layer {name!r}, which the model lacks")
        try:
            precision = parse_precision(precision_name)
            check_applicable(name, modules[name], precision)
            float_shape = with_bias_template(modules[name]) if name in folds else modules[name]
            replacements[name] = build_empty(float_shape, precision)
        except MixprecError as exc:
            raise CheckpointError(f"layer {name!r} cannot take the saved precision: {exc}") from None
        if name in folds:
            replacements[name].folded_batchnorm = folds[name]
        if name in relus:
            replacements[name].fused_relu = relus[name]
    replacements.update({merged: nn.Identity() for merged in (*folds.values(), *relus.values())})
    expected = _expected_state(model, replacements)
    tensors = dict(stored)
    for key, canonical in aliases.items():
        if canonical not in stored:
            raise CheckpointError(f"alias {key!r} points at missing tensor {canonical!r}")
        tensors[key] = stored[canonical]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, target in expected.items():
        got = tensors[key]
        if got.shape != target.shape or got.dtype != target.dtype:
            raise CheckpointError(
                f"tensor {key!r}: checkpoint has {got.dtype} {tuple(got.shape)}, "
                f"the model needs {target.dtype} {tuple(target.shape)}"
            )
        if key.rpartition(".")[2] in ("weight_scale", "input_scale") and not (
            all_finite(got) and (got > 0).all()
        ):
            raise CheckpointError(f"tensor {key!r} holds scales that are not finite and positive")
    for name, new in replacements.items():
        prefix = f"{name}."
        new.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    with torch.no_grad():
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        warn_slow_paths(replacements.items())
        guard_save_pretrained(model)
        model.load_state_dict({k: tensors[k] for k in expected})
        sharing = share_tied_storage(model, tied)  # tied layers saved as one tensor hold one again
    release_free_heap()  # the float layers replaced and the file's tensors copied in (see mixprec.heap)
    return _loaded_report(model, layers, fp32_bytes, sharing)


def _merged_into_convs(merged: dict, kinds: tuple[type[nn.Module], ...], what: str, layers: dict[str, str],
                       modules: dict[str, nn.Module]) -> dict[str, str]:
    """Convolution -> the module merged into it (a folded BatchNorm, a fused ReLU), after checking
    both exist as such."""
    into = {}
    for name, conv in merged.items():
        if not isinstance(modules.get(name), kinds):
            got = type(modules[name]).__name__ if name in modules else "nothing"
            raise CheckpointError(f"checkpoint {what} {name!r} into {conv!r}, but the model has {got} there")
        if conv not in layers or not is_conv(modules.get(conv, nn.Identity())):
            raise CheckpointError(f"checkpoint {what} {name!r} into {conv!r}, which is not a quantized convolution "
                                  "of the checkpoint and the model")
        into[conv] = name
    return into


def _expected_state(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        if not any(key.startswith(f"{name}.") for name in replacements):
            state[key] = tensor
    for name, module in replacements.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def _loaded_report(model: nn.Module, layers: dict[str, str], fp32_bytes: int, sharing: dict[str, str]) -> QuantReport:
    rows = []
    for name, module in modules_with_tensors(model):
        bytes_after = own_bytes(module)
        kernel = getattr(module, "kernel", "unchanged")
        if name in sharing:
            kernel = sharing_note(kernel, sharing[name])
        rows.append(LayerReport(
            name=name, module_type=type(module).__name__, precision=layers.get(name, "fp32"),
            kernel=kernel, rule="checkpoint",
            bytes_before=bytes_after, bytes_after=bytes_after, slow_path=getattr(module, "slow_path", None) or "",
        ))
    return QuantReport(tuple(rows), model_bytes(model), fp32_bytes)
