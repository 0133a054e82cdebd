"""A prompt's continuation as text, streamed while it is decoded, with the time the prompt took and the decoding rate:
through :class:`~mixprec.nn.native_decoder.NativeLlamaDecoder` (one native call a token) or transformers' own
``generate`` (any architecture and precision). What ``mixprec generate`` runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.nn.kv_cache import check_kv_config
from mixprec.nn.native_decoder import NativeLlamaDecoder, check_sampling

#: Where the tokens come from: mixprec's native decode step, or the quantized model's own ``generate``.
RUNTIMES = ("native", "transformers")
#: The quantized KV cache's tokens per key chunk and its float32 window (``kv_bits``), in both runtimes.
KV_GROUP_SIZE, KV_RESIDUAL = 64, 64


@dataclass(frozen=True)
class TextGeneration:
    """A continuation and its timing (seconds measured with ``time.perf_counter``)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    #: From the call to the first new token: the prompt's forward and the first choice.
    prompt_seconds: float
    #: Tokens after the first, per second of decoding (0.0 when only one token came).
    decode_tokens_per_second: float

    def summary(self) -> str:
        rate = (f", {self.new_tokens - 1} more at {self.decode_tokens_per_second:.1f} tokens/s"
                if self.new_tokens > 1 else "")
        return f"[prompt: {self.prompt_tokens} tokens in {self.prompt_seconds:.3f} s, first new token included{rate}]"


class _TextStream:
    """Collects new token ids, notes when each came (times[0]: when the stream was made, just before generating),
    and writes the text as it grows (a character whose bytes are still coming is held back). Called per token by
    NativeLlamaDecoder; ``put`` / ``end`` are transformers' streamer interface (its first ``put`` is the prompt)."""

    def __init__(self, tokenizer: object, write: Callable[[str], object]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.times = [time.perf_counter()]
        self.shown = ""
        self.prompt_seen = False

    def __call__(self, token: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        if not text.endswith("\ufffd"):
            self.write(text[len(self.shown):])
            self.shown = text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self(int(token))

    def end(self) -> None:
        """Nothing left to write: every token was written when it came."""


def prompt_ids(tokenizer: object, prompt: str, chat: bool = False) -> torch.Tensor:
    """The prompt's token ids (int64 ``[tokens]``); with ``chat``, the prompt as a user's message in the tokenizer's
    chat template, ending where the assistant's answer begins."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("this tokenizer has no chat template: leave chat off and give the text to continue")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],  # type: ignore[attr-defined]
                                               add_generation_prompt=True, tokenize=False)
        return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]  # type: ignore[operator]
    return tokenizer(prompt, return_tensors="pt").input_ids[0]  # type: ignore[operator]


def generate_text(model: nn.Module, tokenizer: object, prompt: str, max_new_tokens: int, runtime: str = "native",
                  eos_token_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                  seed: int | None = None, chat: bool = False, kv_bits: int | None = None,
                  write: Callable[[str], object] = lambda text: None) -> TextGeneration:
    """Continue ``prompt`` (text, tokenized by ``tokenizer``; with ``chat``, answer it as a user's message: see
    :func:`prompt_ids`) by up to ``max_new_tokens`` tokens, stopping after ``eos_token_id``; greedy at
    ``temperature`` 0, else sampled from ``softmax(logits / temperature)`` over the ``top_k`` largest logits
    (``seed`` seeds the draws). ``kv_bits`` (4 or 8) quantizes the KV cache (:class:`mixprec.kv.QuantizedKVCache`'s
    layout, chunks of 64 tokens, the newest 64 to 127 in float32; None: float32). ``write`` receives the new text as it
    is decoded."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, int(model.config.vocab_size))  # type: ignore[union-attr]
    if kv_bits is not None:
        check_kv_config(kv_bits, KV_GROUP_SIZE, KV_RESIDUAL)
    ids = prompt_ids(tokenizer, prompt, chat)
    if runtime == "native":
        decoder = NativeLlamaDecoder(model, max_length=len(ids) + max_new_tokens, kv_bits=kv_bits,
                                     kv_group_size=KV_GROUP_SIZE, kv_residual=KV_RESIDUAL)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        stream = _TextStream(tokenizer, write)
        decoder.generate(ids, max_new_tokens, eos_token_id=eos_token_id, temperature=temperature, top_k=top_k,
                         generator=generator, streamer=stream)
    else:
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0} if temperature > 0 else {
            "do_sample": False}
        if kv_bits is not None:
            from mixprec.kv import QuantizedKVCache  # needs transformers, as this runtime does

            sampling["past_key_values"] = QuantizedKVCache(kv_bits, KV_GROUP_SIZE, KV_RESIDUAL)
        stream = _TextStream(tokenizer, write)
        with torch.inference_mode():
            model.generate(ids[None], max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,  # type: ignore[operator]
                           pad_token_id=eos_token_id if eos_token_id is not None else 0, streamer=stream, **sampling)
    times = stream.times
    steps = len(stream.tokens) - 1
    return TextGeneration(text=stream.shown, prompt_tokens=len(ids), new_tokens=len(stream.tokens),
                          prompt_seconds=times[1] - times[0],
                          decode_tokens_per_second=steps / (times[-1] - times[1]) if steps else 0.0)
