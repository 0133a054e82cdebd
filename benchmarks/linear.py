"""One Linear layer (default 4096 x 4096) in every mixprec precision against float32 and
PyTorch's own dynamic int8, at several batch sizes M.

All paths are timed in one process, interleaved, median of ``--rounds`` rounds; the
output is the time per call and the speed-up over float32.

    .venv/bin/python benchmarks/linear.py [--features 4096] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

import mixprec
from mixprec.bench.peers import torch_dynamic_int8
from mixprec.bench.sweep import batch_sweep
from mixprec.nn import Int8DynamicLinear
from mixprec.report.results import print_table, write_csv

BATCHES = (1, 8, 128, 1024)


def peer_paths(layer: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """torchao and optimum-quanto int8 paths (install with ``pip install -e '.[bench]'``)."""
    peers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = copy.deepcopy(layer)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        peers["torchao Int8DynamicActivationInt8Weight (eager)"] = model
    except Exception as exc:  # a missing or incompatible peer is reported, never hidden
        print(f"torchao unavailable: {type(exc).__name__}: {exc}")
    try:
        from optimum import quanto

        model = copy.deepcopy(layer)
        quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
        quanto.freeze(model)
        peers["optimum-quanto W8A8"] = model
    except Exception as exc:
        print(f"optimum-quanto unavailable: {type(exc).__name__}: {exc}")
    return peers


def mixprec_path(layer: nn.Module, precision: str) -> nn.Module:
    model = copy.deepcopy(layer)
    mixprec.quantize(model, precision)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--csv", type=Path, default=Path("runs/bench/linear.csv"))
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(args.features, args.features)).eval()
    dense_int8 = nn.Sequential(Int8DynamicLinear.from_float(layer[0]))
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp32": layer}
    kernels = {}
    for precision in ("int8", "w8", "w4", "bf16", "fp16"):
        model = mixprec_path(layer, precision)
        candidates[f"mixprec {precision}"] = model
        kernels[f"mixprec {precision}"] = model[0].kernel
    candidates["mixprec int8, _int_mm forced"] = dense_int8
    kernels["mixprec int8, _int_mm forced"] = dense_int8[0].kernel
    for engine in ("x86", "onednn"):
        candidates[f"torch dynamic int8 ({engine})"] = torch_dynamic_int8(layer, engine)
    candidates.update(peer_paths(layer))
    rows, columns = batch_sweep(
        candidates, lambda batch: torch.randn(batch, args.features),
        BATCHES, args.rounds, prefix="M", unit="ms", min_seconds=0.1
    )
    print_table(f"Linear {args.features}x{args.features}, torch {torch.__version__}, {torch.get_num_threads()} "
                f"threads, median of {args.rounds} interleaved rounds", rows, columns, Console(width=200))
    for name, kernel in kernels.items():
        print(f"{name}: {kernel}")
    write_csv(args.csv, rows, columns)


if __name__ == "__main__":
    main()
