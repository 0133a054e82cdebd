"""Causal-LM decoding measurements: one-token decode steps, the bytes a step reads, and this
machine's DRAM read bandwidth (the yardstick of a memory-bound decode).

A decode step here always decodes the same position: the KV cache is cut back to the prompt
after every call, so repeated calls time the same work (a growing cache would make later
calls slower and rounds unequal).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixprec.accounting import own_tensors
from mixprec.nn.native_decoder import NativeLlamaDecoder

#: Bytes of the array summed by :func:`dram_read_bandwidth` (1 GiB: 32x this CPU's L3).
BANDWIDTH_ARRAY_BYTES = 1 << 30


def dram_read_bandwidth(repeats: int = 7) -> float:
    """Bytes per second of reading a 1 GiB float32 array once (``sum`` on PyTorch's threads),
    the median of ``repeats`` passes after one warm-up pass."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    array = torch.ones(BANDWIDTH_ARRAY_BYTES // 4)
    array.sum()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        array.sum()
        seconds.append(time.perf_counter() - start)
    return BANDWIDTH_ARRAY_BYTES / statistics.median(seconds)


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes of a tensor's elements; a tensor subclass (torchao's packed weights) counts the
    plain tensors it is made of."""
    if isinstance(tensor, nn.Parameter):
        tensor = tensor.data
    if type(tensor) is not torch.Tensor and hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _distinct_tensors(module: nn.Module) -> list[Tensor]:
    """Every tensor ``module`` and its children save (their state-dict tensors: a prepacked int8
    weight as its codes), a tensor two modules hold (a tied head) once."""
    distinct: dict[int, Tensor] = {}
    for child in module.modules():
        for tensor in own_tensors(child):
            distinct.setdefault(id(tensor), tensor)  # the dict keeps tensors made on the fly alive
    return list(distinct.values())


def decode_step_bytes(model: nn.Module, embedding: nn.Module) -> int:
    """Weight bytes one decode step reads: every tensor of the model once (a head tied to the
    embedding counts once, as the head reads it whole), except that the input embedding reads a
    single row. The KV cache, a few kB per layer at short contexts, is not counted."""
    if not isinstance(model, nn.Module) or not isinstance(embedding, nn.Module):
        raise TypeError(f"decode_step_bytes takes two modules, got {type(model).__name__} and "
                        f"{type(embedding).__name__}")
    if not any(module is embedding for module in model.modules()):
        raise ValueError("embedding must be the model's own input embedding module "
                         "(model.get_input_embeddings()), not a module outside the model")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_ids = {id(t) for t in own_tensors(embedding)}
    tied = head is not None and any(id(t) in embedding_ids for t in own_tensors(head))
    total = sum(tensor_bytes(t) for t in _distinct_tensors(model))
    if tied:
        return total
    embedding_bytes = sum(tensor_bytes(t) for t in _distinct_tensors(embedding))
    rows = int(getattr(embedding, "num_embeddings", 0) or model.config.vocab_size)
    return total - embedding_bytes + embedding_bytes // rows


def torch_decode_step(model: nn.Module, prompt: Tensor) -> Callable[[], object]:
    """A call that decodes the token after ``prompt`` (1-D token ids) with a Hugging Face
    causal LM and its ``DynamicCache``, then crops the cache back to the prompt."""
    from transformers import DynamicCache

    if prompt.dim() != 1 or len(prompt) < 2:
        raise ValueError(f"prompt must be 1-D token ids of at least 2 tokens, got shape {tuple(prompt.shape)}")
    cache = DynamicCache()
    with torch.no_grad():
        model(prompt[None], past_key_values=cache, use_cache=True)
    step = prompt[-1:][None]

    @torch.no_grad()
    def decode() -> object:
        out = model(step, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the step just taken: every call decodes position len(prompt)
        return out

    return decode


def native_decode_step(decoder: NativeLlamaDecoder, prompt: Tensor) -> Callable[[], object]:
    """Prefills ``prompt`` (1-D token ids) into ``decoder``; returns a call that decodes the token after it, then
    cuts the cache back to the prompt (every call decodes position ``len(prompt)``)."""
    if prompt.dim() != 1 or len(prompt) < 2:
        raise ValueError(f"prompt must be 1-D token ids of at least 2 tokens, got shape {tuple(prompt.shape)}")
    decoder(prompt)
    step = prompt[-1:]

    def decode() -> object:
        decoder.truncate(len(prompt))
        return decoder(step)

    return decode


def llama_cpp_decode_step(llm: object, prompt: Tensor) -> Callable[[], object]:
    """The same for a ``llama_cpp.Llama``: its KV cache is cut back to the prompt before each step."""
    if prompt.dim() != 1 or len(prompt) < 2:
        raise ValueError(f"prompt must be 1-D token ids of at least 2 tokens, got shape {tuple(prompt.shape)}")
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(prompt.tolist())  # type: ignore[attr-defined]
    last = int(prompt[-1])

    def decode() -> object:
        llm.n_tokens = len(prompt)  # type: ignore[attr-defined]  # eval() drops the cache past n_tokens
        llm.eval([last])  # type: ignore[attr-defined]
        return None

    return decode
