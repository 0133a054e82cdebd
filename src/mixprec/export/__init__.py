"""Bridges to other runtimes: ``mixprec.export(model, path, format=...)``.

Each format is one module that maps a quantized layer's codes and scales to the format's
own storage without a second rounding, registered in :mod:`mixprec.export.registry`,
which refuses, by layer name, what a format cannot hold. Formats:

- ``gguf``: llama.cpp / Ollama (:mod:`mixprec.export.gguf`).
- ``compressed-tensors``: vLLM, SGLang, transformers (:mod:`mixprec.export.compressed_tensors`).
- ``onnx``: ONNX Runtime (:mod:`mixprec.export.onnx`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mixprec.errors import ExportError
from mixprec.export import compressed_tensors as _compressed_tensors  # noqa: F401  (registers the format)
from mixprec.export import gguf as _gguf  # noqa: F401
from mixprec.export import onnx as _onnx  # noqa: F401
from mixprec.export.registry import FORMATS, ExportLayer, find_format, layer_kind, model_layers, refuse_unheld
from mixprec.io_utils import atomic_folder, atomic_path
from mixprec.policy import Policy
from mixprec.precision import built_name


def export(model: nn.Module, path: str | os.PathLike[str], format: str, *, overwrite: bool = False,
           **options: object) -> Path:
    """Write ``model`` (as :func:`mixprec.quantize` left it) in ``format`` at ``path``.

    Every layer keeps the precision it has: a layer the format cannot hold is refused by
    name with the nearest precision it can hold, before anything is written. The output
    is written under a temporary name and renamed into place; an existing ``path`` is
    refused unless ``overwrite`` is True. ``options`` are the format's own (``gguf``:
    ``tokenizer``, ``gguf_pre``, ``name``; ``compressed-tensors``: ``tokenizer``; ``onnx``:
    ``example``, an input tensor for models that are not transformers encoders). Returns the
    path written (a file, or a folder for ``compressed-tensors``).
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"export takes a torch.nn.Module, got {type(model).__name__}")
    fmt = find_format(format)
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        raise ExportError(f"format {fmt.name!r} takes the options {', '.join(fmt.options) or 'none'}; "
                          f"got {', '.join(unknown)}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; choose another path or pass overwrite=True (--overwrite) to replace it")
    if target.exists() and target.is_dir() != fmt.folder:
        raise ExportError(f"{target} is a {'folder' if target.is_dir() else 'file'}; format {fmt.name!r} writes a "
                          f"{'folder' if fmt.folder else 'file'}")
    refuse_unheld(fmt, model_layers(model))
    if fmt.folder:
        with atomic_folder(target, replace=overwrite) as tmp:
            fmt.write(model, tmp, dict(options))
    else:
        with atomic_path(target) as tmp:
            fmt.write(model, tmp, dict(options))
    return target


def check_exportable(model: nn.Module, policy: Policy, format: str) -> None:
    """Refuse (ExportError, naming every layer) a policy whose precisions ``format`` cannot
    hold, before anything is quantized."""
    fmt = find_format(format)
    layers = [ExportLayer(plan.name, layer_kind(plan.module) or "linear", built_name(plan.module, plan.precision))
              for plan in policy.plan(model)]
    refuse_unheld(fmt, layers)


__all__ = ["FORMATS", "check_exportable", "export"]
