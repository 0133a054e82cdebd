"""Loading Hugging Face models for mixprec's commands (needs the ``hf`` extra)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mixprec.errors import DataError


def _transformers():  # noqa: ANN202
    try:
        import transformers
    except ImportError:
        raise DataError("loading Hugging Face models needs transformers: pip install 'mixprec[hf]'") from None
    return transformers


def _source(name_or_path: str) -> tuple[str, dict]:
    """``(folder or hub name, extra from_pretrained arguments)``: a ``.gguf`` file loads through
    transformers' GGUF reader (dequantized to float32); a local path loads offline."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DataError(f"no GGUF file at {name_or_path!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local copy needs no network
    elif path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise DataError(f"no model folder at {name_or_path!r} (give a local folder, a .gguf file or a hub name "
                        "like 'HuggingFaceTB/SmolLM2-135M')")
    return name_or_path, {}


def load_pretrained(name_or_path: str, causal_lm: bool = False, own_architecture: bool = False) -> nn.Module:
    """``from_pretrained`` in float32 and eval mode: ``transformers.AutoModel``, or
    ``AutoModelForCausalLM`` (``causal_lm``), or the class the config names first in
    ``architectures`` (``own_architecture``, e.g. with its LM head). A local folder or
    ``.gguf`` file loads offline."""
    transformers = _transformers()
    source, extra = _source(name_or_path)
    try:
        import torch

        auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
        if own_architecture:
            names = getattr(transformers.AutoConfig.from_pretrained(source, **extra), "architectures", None) or []
            auto = getattr(transformers, names[0], auto) if names else auto
        return auto.from_pretrained(source, dtype=torch.float32, **extra).eval()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a Hugging Face model from {name_or_path!r}: {exc}") from None


def load_tokenizer(name_or_path: str) -> object:
    """The model's ``transformers.AutoTokenizer`` (from the same folder, hub name or .gguf file)."""
    transformers = _transformers()
    source, extra = _source(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from None
