"""The Fashion-MNIST MLP (784-64-10): mixprec precisions against float32 and PyTorch's own
dynamic int8 (torch.ao quantize_dynamic, x86/fbgemm and onednn engines); float32, ``int8`` and
``int8-static`` again under ``torch.compile`` (static shapes, one graph per batch size).

All candidates are timed in one process, interleaved, median of ``--rounds`` rounds.
Weights are the study's trained fp32 checkpoint when given, else random (speed does not
depend on the values).

    .venv/bin/python benchmarks/mlp_vs_pytorch.py [--checkpoint runs/fashion-mnist/mlp_fp32.safetensors]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

import mixprec
from mixprec.bench.peers import allow_compiled_versions, compiled_name, torch_dynamic_int8
from mixprec.bench.sweep import batch_sweep
from mixprec.report.results import print_table, write_csv
from mixprec.studies.fashion_mnist import MLP

BATCHES = (1, 32, 256)
COMPILED = ("fp32", "mixprec int8", "mixprec int8-static")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="fp32 MLP checkpoint written by the study")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--csv", type=Path, default=Path("runs/bench/mlp_vs_pytorch.csv"))
    args = parser.parse_args()
    torch.manual_seed(0)
    fp32 = MLP().eval()
    if args.checkpoint:
        mixprec.load(fp32, args.checkpoint)
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp32": fp32}
    calibration = [torch.rand(256, 784)]
    for precision in ("int8", "int8-static", "w8", "bf16"):
        model = copy.deepcopy(fp32)
        mixprec.quantize(model, precision, calibration=calibration)
        candidates[f"mixprec {precision}"] = model
    for engine in ("x86", "onednn"):
        candidates[f"torch dynamic int8 ({engine})"] = torch_dynamic_int8(fp32, engine)
    for name in COMPILED:
        candidates[compiled_name(name)] = torch.compile(candidates[name], dynamic=False)
    with allow_compiled_versions(len(COMPILED) * len(BATCHES)):
        rows, columns = batch_sweep(
            candidates, lambda batch: torch.rand(batch, 784),
            BATCHES, args.rounds, prefix="b", unit="us", min_seconds=0.05
        )
    print_table(f"MLP 784-64-10, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"median of {args.rounds} interleaved rounds", rows, columns, Console(width=160))
    write_csv(args.csv, rows, columns)


if __name__ == "__main__":
    main()
