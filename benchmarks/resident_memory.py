"""Resident memory of a process after ``mixprec.quantize``, with and without giving freed heap back (mixprec.heap).

    .venv/bin/python benchmarks/resident_memory.py [--policies "w4a8g32 / head int8,int8"]

The 1.17B Llama shape of ``benchmarks/decode.py`` (random weights, seed 0; 4.7 GB in float32) is built and quantized
in a fresh child process per policy and way, under glibc's default allocator settings (what a user's process has;
the other memory benchmarks tune them to read steady memory, which hides this): once as mixprec does it, and once
with ``release_free_heap`` switched off inside ``quantize``. Reported: anonymous resident memory (``RssAnon``) with
the float model, after quantizing, the model's own tensor bytes, and the excess of the process over them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mixprec.report.results import print_table, write_csv


def child(policy: str, release: bool) -> None:
    import importlib

    import torch

    import mixprec
    from mixprec.accounting import model_bytes
    from mixprec.bench.process_memory import anon_bytes

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import MIXPREC_POLICIES, llama_1b

    torch.set_num_threads(2)
    if not release:
        importlib.import_module("mixprec.quantize").release_free_heap = lambda: False
    baseline = anon_bytes()
    model = llama_1b(49152)
    float_bytes = anon_bytes()
    mixprec.quantize(model, MIXPREC_POLICIES[policy])
    after = anon_bytes()
    print(json.dumps({"baseline": baseline, "float": float_bytes, "after": after, "model": model_bytes(model)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="w4a8g32 / head int8,int8")
    parser.add_argument("--out", type=Path, default=Path("runs/resident-memory"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "release")
        return
    rows = []
    for policy in args.policies.split(","):
        for way in ("release", "keep"):
            result = subprocess.run([sys.executable, __file__, "--child", policy, way], check=True, text=True,
                                    capture_output=True)
            got = json.loads(result.stdout.strip().splitlines()[-1])
            mb = {key: value / 2**20 for key, value in got.items()}
            rows.append({"policy": policy, "freed heap": "given back" if way == "release" else "kept (before)",
                         "process MB before the model": round(mb["baseline"]),
                         "with the float model": round(mb["float"]), "after quantize": round(mb["after"]),
                         "model tensors MB": round(mb["model"]),
                         "process - model - before": round(mb["after"] - mb["model"] - mb["baseline"])})
            print(rows[-1], flush=True)
    print_table("anonymous resident memory, MiB (a fresh process per row)", rows, tuple(rows[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "resident_memory.csv", rows, tuple(rows[0]))


if __name__ == "__main__":
    main()
