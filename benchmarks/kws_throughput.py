"""Throughput of the keyword-spotting pipeline (issue 4): the float32 PyTorch model, mixprec's
numpy reference engine and the fused native pass, batched, interleaved rounds, medians.

    .venv/bin/python benchmarks/kws_throughput.py [--batches 1 256 4096] [--rounds 7] [--dtype float16]

Uses the stored weights of examples/kws_synthetic.py (trained there) and its held-out inputs.
Before timing, the fused pass is checked byte for byte against the reference on every batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import kws_synthetic  # noqa: E402
from example_modes import load_model  # noqa: E402

from mixprec.integer.models.kws import FusedKeywordSpotter, build_pipeline  # noqa: E402
from mixprec.timing import interleaved_medians  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256, 4096])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args(argv)
    model = load_model("kws_synthetic", kws_synthetic.make_model)
    pipeline = build_pipeline(model, kws_synthetic.calibration_set(), args.dtype)
    fused = FusedKeywordSpotter(pipeline)
    features, _ = kws_synthetic.make_set(max(args.batches), seed=2)
    print(f"torch threads {torch.get_num_threads()}; half island {args.dtype}")
    print("batch,engine,seconds_per_batch,samples_per_s,vs_float32")
    for batch in args.batches:
        x_float = features[:batch]
        codes = pipeline.quantize_input(x_float.numpy())
        if not np.array_equal(fused(codes), pipeline(codes)):
            raise SystemExit(f"batch {batch}: the fused pass differs from the reference")

        def float32_model(x: torch.Tensor = x_float) -> None:
            with torch.inference_mode():
                model(x)

        medians = interleaved_medians({"float32 torch": float32_model, "numpy reference": lambda c=codes: pipeline(c),
                                       "fused native": lambda c=codes: fused(c)}, rounds=args.rounds)
        for name, seconds in medians.items():
            print(f"{batch},{name},{seconds:.6g},{batch / seconds:.0f},{medians['float32 torch'] / seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
