"""One decode step of attention over the quantized KV cache, one layer (issue 6): attention on
the codes, dequantize + PyTorch SDPA, and SDPA on a float32 cache, interleaved rounds, medians.

    .venv/bin/python benchmarks/kv_attention.py [--tokens 512 1024 2048] [--rounds 7]

Shape of SmolLM2-135M's layers by default: 3 KV heads, 9 query heads, head_dim 64, batch 1;
the cache holds random keys (one outlier channel) and values, group 64, window 64.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixprec.nn.kv_cache import QuantizedKV
from mixprec.timing import interleaved_medians


def step_paths(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor,
               scaling: float) -> dict[str, Callable[[], torch.Tensor]]:
    """Each way to run one decode step over a cache holding ``keys`` and ``values``."""
    paths = {"float32 cache, SDPA": lambda: F.scaled_dot_product_attention(query, keys, values, scale=scaling,
                                                                           enable_gqa=True)}
    for bits in (8, 4):
        store = QuantizedKV(bits, 64, 64)
        store.append(keys, values)

        def dequantize_then_sdpa(s: QuantizedKV = store) -> torch.Tensor:
            k, v = s.states(torch.float32)
            return F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)

        codes = f"int{bits}, attention on codes{'' if store.reads_codes(query) else ' (fallback)'}"
        paths[codes] = lambda s=store: s.attend(query, scaling)
        paths[f"int{bits}, dequantize + SDPA"] = dequantize_then_sdpa
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--query-heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    if min(args.tokens) < 1 or args.rounds < 1 or args.query_heads % args.kv_heads:
        parser.error("tokens and rounds must be >= 1 and query heads a multiple of KV heads")
    generator = torch.Generator().manual_seed(0)
    scaling = args.head_dim ** -0.5
    print(f"torch threads {torch.get_num_threads()}; {args.kv_heads} KV heads, {args.query_heads} query heads, "
          f"head_dim {args.head_dim}")
    print("tokens,path,ms_per_step,vs_float_sdpa")
    for tokens in args.tokens:
        keys = torch.randn(1, args.kv_heads, tokens, args.head_dim, generator=generator)
        keys[..., 5] *= 20.0
        values = torch.randn(1, args.kv_heads, tokens, args.head_dim, generator=generator)
        query = torch.randn(1, args.query_heads, 1, args.head_dim, generator=generator)
        medians = interleaved_medians(step_paths(keys, values, query, scaling), rounds=args.rounds, min_seconds=0.1)
        for name, seconds in medians.items():
            print(f"{tokens},{name},{seconds * 1e3:.4f},{medians['float32 cache, SDPA'] / seconds:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
