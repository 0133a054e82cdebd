"""Where a forward of the BERT-shaped encoder spends its time, per operator (PyTorch profiler,
self CPU time per forward), for one path of ``mixprec bench encoder`` (compiled paths included:
their fused inductor kernels are inside the ``## Call CompiledFxGraph`` row).

    .venv/bin/python benchmarks/encoder_profile.py ["mixprec int8, compiled"] [--forwards 5] [--top 8]
"""

from __future__ import annotations

import argparse

import torch

from mixprec.bench.encoder import EncoderShape, path_builders
from mixprec.bench.profiling import print_profile, self_cpu_ms_per_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    builders = path_builders()
    parser.add_argument("path", nargs="?", default="mixprec int8", choices=sorted(builders))
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    if args.forwards < 1 or args.top < 1:
        parser.error("--forwards and --top must be >= 1")
    shape = EncoderShape()
    forward = builders[args.path](shape.model())
    x = shape.input()
    with torch.no_grad():
        rows = self_cpu_ms_per_call(lambda: forward(x), args.forwards, warmup=3)
    print_profile(f"{args.path}, {torch.get_num_threads()} threads", rows, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
