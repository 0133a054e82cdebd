"""The dynamic int8 linear at many rows (prefill), one layer: mixprec's dispatch against the
``torch._int_mm`` path it replaces on CPUs whose oneDNN has no VNNI/AMX int8 GEMM, and float32;
interleaved rounds, medians, one process.

    .venv/bin/python benchmarks/int8_many_rows.py [--rows 8 32 128] [--rounds 5]

Shape of the 1.17B decode benchmark's MLP up-projection by default (5632 x 2048). Every int8 path
gives the same bits (checked here before timing).
"""

from __future__ import annotations

import argparse

import torch

from mixprec.kernels import int8_linear, native, onednn_int8
from mixprec.timing import interleaved_medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out-features", type=int, default=5632)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.rounds < 1 or min(args.out_features, args.in_features) < 1:
        parser.error("rows, rounds and the layer's features must be >= 1")
    if not native.available():
        parser.error(f"the native kernels are not available: {native.load_error()}")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (args.out_features, args.in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(args.out_features, generator=generator) * 0.01
    dense = weight.float()
    print(f"torch threads {torch.get_num_threads()}; oneDNN VNNI/AMX int8 GEMM: {onednn_int8.available()}; "
          f"{args.out_features} x {args.in_features} weight")
    print("rows,path,ms,vs_float32")
    for rows in args.rows:
        x = torch.randn(rows, args.in_features, generator=generator)
        paths = {"float32": lambda x=x: x @ dense.t(),
                 "mixprec int8 (dispatch)": lambda x=x: int8_linear.int8_linear_dynamic(x, weight, scale, None),
                 "torch._int_mm path": lambda x=x: native.int8_linear_dynamic(x, weight, scale, None)}
        if not torch.equal(paths["mixprec int8 (dispatch)"](), paths["torch._int_mm path"]()):
            raise SystemExit(f"the int8 paths differ at {rows} rows")
        medians = interleaved_medians(paths, rounds=args.rounds, min_seconds=0.2)
        for name, seconds in medians.items():
            print(f"{rows},{name},{seconds * 1e3:.2f},{medians['float32'] / seconds:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
