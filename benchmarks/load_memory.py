"""Peak memory of quantizing while loading (issue 17): ``from_pretrained(...,
quantization_config=MixprecConfig(policy))`` against loading in float32 and then
``mixprec.quantize``.

    .venv/bin/python benchmarks/load_memory.py [--layers 8] [--hidden 1024]

A Llama-shaped model with random weights (built here, nothing downloaded; untied head) is saved
in float32 with ``save_pretrained``; each way of loading runs in a fresh child process (glibc
returns every block of 64 KiB or more on free there, see :mod:`mixprec.bench.process_memory`)
that samples its anonymous resident memory (file-backed pages of the memory-mapped checkpoint
are not counted). Reported: the peak over the process's memory before loading, the steady
memory after, the model's own tensor bytes, the peak's excess over them, and that excess as a
multiple of the largest layer's float32 size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

POLICY = {"default": "w4g32", "rules": [{"pattern": r"model\.embed_tokens", "precision": "int8"}]}


def child(folder: str, way: str) -> None:
    import torch
    import transformers

    import mixprec
    from mixprec import Policy
    from mixprec.bench.process_memory import PeakSampler, anon_bytes
    from mixprec.export.hf_quantizer import MixprecConfig

    before = anon_bytes()
    with PeakSampler() as sampler:
        if way == "quantize while loading":
            model = transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(POLICY))
        else:
            model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
            mixprec.quantize(model, Policy.from_dict(POLICY))
    steady = anon_bytes() - before
    held = sum(t.nbytes for t in model.state_dict().values())
    print(json.dumps({"peak": sampler.peak - before, "steady": steady, "model_bytes": held}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch
    import transformers

    from mixprec.bench.process_memory import child_environment

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    float_bytes = sum(p.nbytes for p in model.parameters())
    largest = max(m.weight.nbytes for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    folder = Path(tempfile.mkdtemp(prefix="mixprec-load-")) / "model"
    model.save_pretrained(folder)
    del model
    print(f"float32 model {float_bytes:,} B, largest layer {largest:,} B (float32), policy {POLICY}")
    for way in ("quantize while loading", "float32 load, then mixprec.quantize"):
        result = subprocess.run([sys.executable, __file__, "--child", str(folder), way], capture_output=True,
                                text=True, env=child_environment(), check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        excess = figures["peak"] - figures["model_bytes"]
        print(f"{way}: peak {figures['peak']:,} B, steady {figures['steady']:,} B, model {figures['model_bytes']:,} B "
              f"({float_bytes / figures['model_bytes']:.2f}x smaller than float32), peak - model {excess:,} B = "
              f"{excess / largest:.2f}x the largest float32 layer")


if __name__ == "__main__":
    main()
