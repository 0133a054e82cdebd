"""Tokenizer metadata for GGUF files from a Hugging Face (``tokenizers``-backed) BPE tokenizer.

llama.cpp's ``gpt2`` tokenizer model is byte-level BPE: the token strings in the GPT-2
byte-to-unicode alphabet (as ``tokenizer.json`` holds them), their merges as ``"a b"``
strings, a type per token (normal, control for special added tokens, user-defined for the
other added tokens, unused for padding up to the model's vocabulary size) and the special
token ids. ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer (the regular expressions
that split text before BPE); only the plain GPT-2 one can be recognised from the
tokenizer itself, any other must be named by the caller (e.g. ``smollm``, ``llama-bpe``,
``qwen2``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mixprec.errors import ExportError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class GgufTokenizer:
    """Everything the GGUF ``tokenizer.*`` keys hold."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    chat_template: str | None = None


def _backend_json(tokenizer: object) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"GGUF export needs the model's Hugging Face tokenizer (a fast, tokenizers-backed one) to write the "
            f"vocabulary llama.cpp reads; got {type(tokenizer).__name__}: "
            "pass tokenizer=AutoTokenizer.from_pretrained(...)"
        )
    return json.loads(backend.to_str())


def _is_plain_byte_level(node: dict | None) -> bool:
    return bool(node) and node.get("type") == "ByteLevel" and node.get("use_regex", True)


def gguf_tokenizer(tokenizer: object, vocab_size: int, pre: str | None = None) -> GgufTokenizer:
    """The GGUF tokenizer metadata of a byte-level BPE ``tokenizer`` for a model with
    ``vocab_size`` embedding rows; ``pre`` names llama.cpp's pre-tokenizer (inferred only
    for the plain GPT-2 one)."""
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2 style); this one is "
            f"{model.get('type')!r} with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]}"
        )
    if pre is None:
        if not _is_plain_byte_level(spec.get("pre_tokenizer")):
            raise ExportError("this tokenizer splits text with its own pre-tokenizer rules; name llama.cpp's "
                              "pre-tokenizer for it (gguf_pre='llama-bpe', 'qwen2', 'smollm', ...)")
        pre = "gpt-2"
    if not isinstance(pre, str) or not pre:
        raise ExportError(f"gguf_pre must be a non-empty string naming llama.cpp's pre-tokenizer, got {pre!r}")
    by_id: dict[int, tuple[str, int]] = {index: (text, NORMAL) for text, index in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model embeds only {vocab_size} tokens")
    tokens, types = [], []
    for index in range(vocab_size):
        text, kind = by_id.get(index, (f"[PAD{index}]", UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    special_ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(index, int):
            special_ids[role] = index
    template = getattr(tokenizer, "chat_template", None)
    return GgufTokenizer(pre=pre, tokens=tokens, token_types=types, merges=merges, special_ids=special_ids,
                         add_bos=bool(getattr(tokenizer, "add_bos_token", False)),
                         chat_template=template if isinstance(template, str) else None)
