"""Where a forward of the BERT-shaped encoder spends its time, per operator (PyTorch profiler,
self CPU time per forward), for one mixprec path of ``mixprec bench encoder``.

    .venv/bin/python benchmarks/encoder_profile.py ["mixprec int8"] [--forwards 5] [--top 8]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from mixprec.bench.encoder import POLICIES, EncoderShape
from mixprec.quantize import quantize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="mixprec int8", choices=sorted(POLICIES))
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    if args.forwards < 1 or args.top < 1:
        parser.error("--forwards and --top must be >= 1")
    shape = EncoderShape()
    model = shape.model().eval()
    quantize(model, POLICIES[args.path])
    x = torch.randn(shape.batch, shape.seq, shape.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(3):
            model(x)
        with profile() as prof:
            for _ in range(args.forwards):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"{args.path}: self CPU ms per forward, {torch.get_num_threads()} threads")
    for event in events[: args.top]:
        print(f"{event.key},{event.self_cpu_time_total / args.forwards / 1e3:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
