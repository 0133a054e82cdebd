"""Resident memory of quantizing a convolutional network (issue 15): the highest extra memory
while ``mixprec.quantize`` runs, over the float32 model alone, against the largest layer's
float32 size (target: at most one layer's extra float copy at a time).

    .venv/bin/python benchmarks/cnn_memory.py [--width 512] [--blocks 6]

The network is wide so that its weights dominate what a process holds: a 3x3 stem, ``blocks``
Conv2d(width, width, 3) + BatchNorm + ReLU blocks (BatchNorm folded by ``quantize``), a
depthwise 3x3 + BatchNorm, global pooling and a Linear head. Each policy runs in a fresh child
process (glibc returns large frees to the kernel there), after a warm-up on a tiny copy of the
network so that imports, native builds and thread pools exist before the baseline; memory is
anonymous resident memory sampled every 0.5 ms. ``int8-static`` calibrates on 8 random 32x32
inputs, so its peak includes the calibration pass's activations; the peak of one float forward
of that batch is shown beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch
from torch import nn

import mixprec
from mixprec.bench import process_memory
from mixprec.report.results import print_table

POLICIES = ("bf16", "int8", "int8-static", "w8", "w4")


def wide_cnn(width: int, blocks: int) -> nn.Sequential:
    """The benchmark's network (see module docstring), in eval mode."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(blocks):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers).eval()


def _quantize(model: nn.Module, precision: str) -> None:
    calibration = [torch.randn(8, 3, 32, 32)] if precision == "int8-static" else None
    mixprec.quantize(model, mixprec.Policy(default=precision), calibration=calibration)


def child(precision: str, width: int, blocks: int) -> dict[str, int]:
    """Run in a fresh process: the float model's bytes and quantizing's peak extra bytes."""
    torch.manual_seed(0)
    _quantize(wide_cnn(64, 1), precision)  # warm-up
    gc.collect()
    model = wide_cnn(width, blocks)
    float_bytes = sum(t.nbytes for t in model.state_dict().values())
    gc.collect()
    with_model = process_memory.anon_bytes()
    with torch.no_grad(), process_memory.PeakSampler() as forward:
        model(torch.randn(8, 3, 32, 32))  # what one float forward of the calibration batch takes
    gc.collect()
    with_model = process_memory.anon_bytes()
    with process_memory.PeakSampler() as sampler:
        _quantize(model, precision)
    gc.collect()
    return {"float_bytes": float_bytes, "peak_extra": sampler.peak - with_model,
            "after": process_memory.anon_bytes() - with_model, "forward_peak": forward.peak - with_model}


def largest_layer_bytes(width: int, blocks: int) -> int:
    """Float32 bytes of the network's largest layer (a width x width 3x3 convolution and bias)."""
    return max(sum(t.nbytes for t in m.state_dict().values()) for m in wide_cnn(width, blocks).modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.width, args.blocks)))
        return
    if not process_memory.supported():
        raise SystemExit("resident memory needs Linux /proc/self/status")
    largest = largest_layer_bytes(args.width, args.blocks)
    rows = []
    for precision in POLICIES:
        command = [sys.executable, __file__, "--child", precision, "--width", str(args.width), "--blocks",
                   str(args.blocks)]
        result = subprocess.run(command, capture_output=True, text=True, env=process_memory.child_environment(),
                                check=False)
        if result.returncode != 0:
            raise SystemExit(f"{precision}: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"policy": precision, "float32 MB": round(figures["float_bytes"] / 1e6, 1),
                     "quantize peak extra MB": round(figures["peak_extra"] / 1e6, 1),
                     "peak / largest layer": round(figures["peak_extra"] / largest, 2),
                     "float forward peak MB": round(figures["forward_peak"] / 1e6, 1),
                     "held after MB (vs float)": round(figures["after"] / 1e6, 1)})
    print_table(f"quantizing a {args.blocks}-block width-{args.width} CNN (largest layer {largest / 1e6:.1f} MB)",
                rows, tuple(rows[0]))


if __name__ == "__main__":
    main()
