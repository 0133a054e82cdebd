"""Loading Hugging Face models for mixprec's commands (needs the ``hf`` extra)."""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from torch import nn

from mixprec.errors import DataError


def _transformers():  # noqa: ANN202
    try:
        import transformers
    except ImportError:
        raise DataError("loading Hugging Face models needs transformers: pip install 'mixprec[hf]'") from None
    return transformers


#: Seconds the Hub has to answer before mixprec loads from the local cache only.
HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (None: it answered). One HEAD request to its endpoint
    (``HF_ENDPOINT``), through the environment's proxies, at most :data:`HUB_PROBE_TIMEOUT_S` seconds; any
    HTTP answer counts as reachable. Asked once per process: huggingface_hub itself retries a failed request
    five times over about 23 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except OSError as exc:  # URLError, timeouts, refused connections
        return f"{constants.ENDPOINT} cannot be reached ({getattr(exc, 'reason', exc)})"
    return None


def _source(name_or_path: str) -> tuple[str, dict]:
    """``(folder or hub name, extra from_pretrained arguments)``: a ``.gguf`` file loads through
    transformers' GGUF reader (dequantized to float32); a local path loads offline; a hub name loads
    from the local cache only when the Hub cannot be reached (:func:`_hub_unreachable`)."""
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
    elif _hub_unreachable():
        return name_or_path, {"local_files_only": True}
    return name_or_path, {}


def _load_error(what: str, name_or_path: str, exc: Exception, extra: dict) -> DataError:
    """The error for a failed load; names the Hub's state when only the local cache was read."""
    if extra.get("local_files_only"):
        return DataError(f"cannot load {what} {name_or_path!r}: it is not a local folder and not in the Hugging "
                         f"Face cache, and {_hub_unreachable()}; give a local folder or .gguf file, or download it "
                         "where the Hub can be reached")
    return DataError(f"cannot load {what} {name_or_path!r}: {exc}")


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
        raise _load_error("a Hugging Face model from", name_or_path, exc, extra) from None


def load_tokenizer(name_or_path: str) -> object:
    """The model's ``transformers.AutoTokenizer`` (from the same folder, hub name or .gguf file)."""
    transformers = _transformers()
    source, extra = _source(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error("the tokenizer of", name_or_path, exc, extra) from None
