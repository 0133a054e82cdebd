"""Command-line interface: a thin shell over the library."""

from __future__ import annotations

import argparse
import sys

from mixprec.errors import MixprecError


def _fashion_mnist(args: argparse.Namespace) -> None:
    from mixprec.studies.fashion_mnist import StudyConfig, run

    run(StudyConfig(data=args.data, out=args.out, epochs=args.epochs, seed=args.seed, rounds=args.rounds))


def _explain(args: argparse.Namespace) -> None:
    from mixprec.policy import Policy
    from mixprec.studies.fashion_mnist import MLP

    policy = Policy.from_toml(args.policy)
    print(policy.explain(MLP()))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


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
    explain = sub.add_parser("explain", help="show what a policy TOML does to the study's MLP")
    explain.add_argument("policy", help="policy TOML file")
    explain.set_defaults(func=_explain)
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
