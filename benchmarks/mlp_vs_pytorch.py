"""The Fashion-MNIST MLP (784-64-10): mixprec precisions against float32 and PyTorch's own
dynamic int8 (torch.ao quantize_dynamic, x86/fbgemm and onednn engines).

All candidates are timed in one process, interleaved, median of ``--rounds`` rounds.
Weights are the study's trained fp32 checkpoint when given, else random (speed does not
depend on the values).

    .venv/bin/python benchmarks/mlp_vs_pytorch.py [--checkpoint runs/fashion-mnist/mlp_fp32.safetensors]
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

import mixprec
from mixprec.bench.timing import interleaved_medians
from mixprec.report.results import print_table, write_csv
from mixprec.studies.fashion_mnist import MLP

BATCHES = (1, 32, 256)


def torch_dynamic_int8(model: torch.nn.Module, engine: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """PyTorch's eager dynamic int8 (per-tensor activations), packed for ``engine``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        torch.backends.quantized.engine = engine
        quantized = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    def run(x: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = engine
        return quantized(x)

    return run


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
    rows = []
    with torch.no_grad():
        medians = {}
        for batch in BATCHES:
            x = torch.rand(batch, 784)
            calls = {k: (lambda f=f, x=x: f(x)) for k, f in candidates.items()}
            medians[batch] = interleaved_medians(calls, args.rounds)
    for name in candidates:
        row: dict[str, object] = {"path": name}
        for batch in BATCHES:
            row[f"b{batch}_us"] = round(medians[batch][name] * 1e6, 1)
            row[f"b{batch}_vs_fp32"] = round(medians[batch]["fp32"] / medians[batch][name], 2)
        rows.append(row)
    columns = ["path"] + [f"b{b}_{s}" for b in BATCHES for s in ("us", "vs_fp32")]
    print_table(f"MLP 784-64-10, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"median of {args.rounds} interleaved rounds", rows, columns, Console(width=160))
    write_csv(args.csv, rows, columns)


if __name__ == "__main__":
    main()
