"""Loading Hugging Face models for mixprec's commands (needs the ``hf`` extra)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mixprec.errors import DataError


def load_pretrained(name_or_path: str) -> nn.Module:
    """``transformers.AutoModel.from_pretrained`` in eval mode; a local folder loads offline."""
    try:
        from transformers import AutoModel
    except ImportError:
        raise DataError("loading Hugging Face models needs transformers: pip install 'mixprec[hf]'") from None
    if Path(name_or_path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local copy needs no network
    try:
        return AutoModel.from_pretrained(name_or_path).eval()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a Hugging Face model from {name_or_path!r}: {exc}") from None
