"""Two transformer encoder stacks through mixprec's integer engine, int8 or 16x8 (issues 4, 16).

Vocabulary 16, 8 tokens, width 8, FFN 16, 2 blocks (mixprec.integer.models.encoder.TinyEncoder),
one with softmax attention and one with linear attention. The task has learnable structure:
each sequence draws its 8 tokens from a random 4-token subset of the vocabulary, and every
position must say how often its token occurs (1, 2, 3, or 4 or more), which needs attention.
Trained on 16,384 sequences; calibrated on 512 others; measured on 1,024 held-out sequences
(distinct, none seen in calibration).

    python examples/encoder_stacks.py run [--attention softmax|linear] [--activations int8|int16|mix]
                                          [--budget B] [--range-margin F] [--qat-steps N]
    python examples/encoder_stacks.py bench|golden|plot [--activations int8|int16|mix]

``--activations int16`` builds the graph in TFLite's 16x8 mode (int16 activations, int8
weights, int64 biases; layer norm and the attentions in mixprec's int16 forms). ``mix`` lets
``mixprec.integer.build.mix.choose_wide`` pick which stages take int16 within ``--budget``
times the int8 graph's activation arena, by each stage's measured effect on the output's mean
squared error over 1,024 validation sequences (none held out, none in calibration). With int8,
``run`` also prints what the 16x8 mode would give the same graph, simulated exactly
(``mixprec.integer.graph.simulate(..., activation_bits=16)``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_modes import fine_tune_on_grid as fine_tune  # noqa: E402
from example_modes import fit, plot_parity, stored_model, write_golden  # noqa: E402

from mixprec import Policy  # noqa: E402
from mixprec.integer.build.layers import calibrate  # noqa: E402
from mixprec.integer.build.mix import arena_bytes, choose_wide  # noqa: E402
from mixprec.integer.core.profile import stage_table  # noqa: E402
from mixprec.integer.graph.simulate import operator_errors, rounding_attribution, simulate  # noqa: E402
from mixprec.integer.models.encoder import TinyEncoder, build_encoder_graph, encoder_stages  # noqa: E402
from mixprec.io_utils import atomic_path  # noqa: E402

VOCABULARY, STEPS, CLASSES = 16, 8, 4
#: Issue 16's targets for the encoder stacks: worst error against float32, as a share of the output range.
MAX_OF_RANGE = {"softmax": 0.01, "linear": 0.015}


def make_set(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` id sequences ``[count, 8]`` and per-position labels (occurrences - 1, capped at 3)."""
    rng = np.random.default_rng(seed)
    subsets = np.stack([rng.choice(VOCABULARY, 4, replace=False) for _ in range(count)])
    ids = np.take_along_axis(subsets, rng.integers(0, 4, (count, STEPS)), axis=1)
    occurrences = (ids[:, :, None] == ids[:, None, :]).sum(-1)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.minimum(occurrences, 4) - 1)


def make_model(attention: str) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(VOCABULARY, STEPS, 8, 16, 2, CLASSES, attention)


def train(model: TinyEncoder) -> None:
    """Adam (lr 1e-2), 3,000 steps of 256 sequences."""
    x, y = make_set(16384, seed=1)
    fit(model, x, y, torch.optim.Adam(model.parameters(), lr=1e-2), steps=3000, batch=256)


class OnTableGrid(torch.nn.Module):
    """Parametrization of the embedding table: its values on the engine's own per-tensor
    asymmetric int8 grid (``calibrate`` of the current table), straight-through gradients."""

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        values = table.detach().double().numpy()
        grid = calibrate(values)
        rounded = torch.from_numpy(grid.values_of(grid.nearest_codes(values))).to(table.dtype)
        return table + (rounded - table).detach()


def fine_tune_on_grid(model: TinyEncoder, steps: int) -> None:
    """Quantization-aware fine-tuning (``example_modes.fine_tune_on_grid``): every Linear on
    ``w8``'s per-channel int8 grid (the engine's weight grid), the embedding table on the
    engine's table grid (:class:`OnTableGrid`), ``steps`` steps on the 16,384 training sequences."""
    parametrize.register_parametrization(model.embedding, "weight", OnTableGrid())
    fine_tune(model, Policy([("embedding", "fp32")], default="w8"), *make_set(16384, seed=1), steps)
    parametrize.remove_parametrizations(model.embedding, "weight", leave_parametrized=True)


def held_out_set() -> tuple[torch.Tensor, torch.Tensor]:
    """1,024 held-out sequences, distinct from each other and from the calibration set."""
    calibration = {tuple(row) for row in make_set(512, seed=3)[0].tolist()}
    x, y = make_set(2048, seed=2)
    keep, seen = [], set()
    for index, row in enumerate(map(tuple, x.tolist())):
        if row not in seen and row not in calibration:
            seen.add(row)
            keep.append(index)
    keep = keep[:1024]
    return x[keep], y[keep]


def validation_set() -> torch.Tensor:
    """1,024 sequences for choosing the mix: none in the held-out set or in calibration."""
    excluded = {tuple(row) for row in make_set(512, seed=3)[0].tolist()}
    excluded |= {tuple(row) for row in held_out_set()[0].tolist()}
    x, _ = make_set(2048, seed=7)
    keep = [index for index, row in enumerate(map(tuple, x.tolist())) if row not in excluded]
    return x[keep[:1024]]


def searched_graph(model: TinyEncoder, calibration: torch.Tensor, margin: float, budget: float):  # noqa: ANN201
    """The int8 / int16 mix :func:`choose_wide` picks over the stages (see module docstring), and
    what it chose."""
    validation = validation_set()
    ids, reference = validation.numpy().astype(np.int32), float64_reference(model, validation)

    def build(wide: frozenset):  # noqa: ANN202
        return build_encoder_graph(model, calibration, margin, dict.fromkeys(wide, "int16"))

    def error(graph) -> float:  # noqa: ANN001
        return float(np.mean((graph.output_quant.values_of(graph(ids)) - reference) ** 2))

    return choose_wide(encoder_stages(model), build, error, budget)


def float64_reference(model: TinyEncoder, x: torch.Tensor) -> np.ndarray:
    """The float model's logits for ``x`` computed in float64 (the model is left in float32)."""
    with torch.no_grad():
        reference = model.double()(x).numpy()
    model.float()
    return reference


def evaluate(model: TinyEncoder, graph, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:  # noqa: ANN001
    """Accuracy, and worst errors against float32 and the exact simulation, in steps and of range."""
    ids = x.numpy().astype(np.int32)
    reference = float64_reference(model, x)
    quant = graph.output_quant
    got, simulated = quant.values_of(graph(ids)), simulate(graph, ids)
    step, span = float(quant.scale32[0]), float(reference.max() - reference.min())
    int16 = simulate(graph, ids, activation_bits=16)  # the graph itself when it is int16 already
    return {"float_accuracy": float((reference.argmax(-1) == y.numpy()).mean()),
            "engine_accuracy": float((got.argmax(-1) == y.numpy()).mean()),
            "float_worst_lsb": float(np.abs(got - reference).max() / step),
            "float_worst_of_range": float(np.abs(got - reference).max() / span),
            "float_mean_lsb": float(np.abs(got - reference).mean() / step),
            "float_mean_of_range": float(np.abs(got - reference).mean() / span),
            "engine_worst_lsb": float(np.abs(got - simulated).max() / step),
            "quantization_worst_lsb": float(np.abs(simulated - reference).max() / step),
            "int16_worst_of_range": float(np.abs(int16 - reference).max() / span),
            "operator_worst_lsb": max(error for _, error in operator_errors(graph, ids)), "range": span}


def largest_roundings(model: TinyEncoder, graph, x: torch.Tensor, count: int = 4) -> str:  # noqa: ANN001
    """The tensors whose grids cost the most (mixprec.integer.graph.simulate.rounding_attribution),
    each alone, as a share of the output range."""
    reference = float64_reference(model, x)
    span = float(reference.max() - reference.min())
    attribution = rounding_attribution(graph, x.numpy().astype(np.int32), reference=reference)
    return "worst error with one tensor rounded at a time: " + ", ".join(
        f"{name} {100 * error / span:.2f}%" for name, error in attribution[:count + 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="encoder_stacks", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["run", "bench", "golden", "plot"])
    parser.add_argument("--attention", choices=["softmax", "linear"], nargs="+", default=["softmax", "linear"])
    parser.add_argument("--out", type=Path, default=Path("runs") / "encoder_stacks")
    parser.add_argument("--activations", choices=["int8", "int16", "mix"], default="int8",
                        help="the graph's activations: int8, int16 (TFLite's 16x8 mode), or a searched mix")
    parser.add_argument("--budget", type=float, default=1.3,
                        help="mix: the activation arena allowed, as a multiple of the int8 graph's (default 1.3)")
    parser.add_argument("--range-margin", type=float, default=0.0,
                        help="run: widen every calibrated activation range by this fraction (default 0)")
    parser.add_argument("--qat-steps", type=int, default=0,
                        help="run: first fine-tune this many steps with the weights on their int8 grid (mixprec QAT)")
    args = parser.parse_args(argv)
    if args.qat_steps < 0 or (args.qat_steps and args.mode != "run"):
        parser.error("--qat-steps takes a count >= 0, with the run mode")
    if args.mode == "golden" and args.activations == "mix":
        parser.error("goldens are stored for int8 and int16 graphs; a searched mix is not one")
    if not args.budget >= 1.0:
        parser.error(f"--budget is a multiple of the int8 graph's arena, at least 1.0, got {args.budget}")
    calibration, _ = make_set(512, seed=3)
    x, y = held_out_set()
    failed = 0
    for attention in args.attention:
        name = f"encoder_{attention}"
        model = stored_model(name, lambda a=attention: make_model(a), train, retrain=args.mode == "golden")
        if args.qat_steps:
            fine_tune_on_grid(model, args.qat_steps)
        margin = args.range_margin if args.mode == "run" else 0.0
        if args.activations == "mix":
            choice = searched_graph(model, calibration, margin, args.budget)
            graph = choice.graph
            print(f"{name}: int16 for {', '.join(choice.wide) or 'nothing'}; arena {choice.arena:,} B per sequence = "
                  f"{choice.arena / choice.int8_arena:.2f}x int8's {choice.int8_arena:,} B (all int16: "
                  f"{arena_bytes(build_encoder_graph(model, calibration, margin, 'int16')):,} B)")
        else:
            graph = build_encoder_graph(model, calibration, margin, args.activations)
        ids = x.numpy().astype(np.int32)
        if args.mode == "golden":
            write_golden(name, graph(ids))
        elif args.mode == "bench":
            table = stage_table(graph.profile(np.concatenate([ids] * 4), repeats=5))
            args.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.out / f"{name}.csv") as tmp:
                tmp.write_text(table)
            print(f"{name}, batch {4 * len(ids)}:\n{table}", end="")
        elif args.mode == "plot":
            with torch.no_grad():
                reference = model(x).numpy().ravel()
            out = graph.output_quant
            plot_parity(reference, out.values_of(graph(ids)).ravel(), float(out.scale32[0]), args.out / f"{name}.png",
                        f"encoder stack {name!r}: {args.activations} engine, {len(ids)} held-out sequences")
        else:
            f = evaluate(model, graph, x, y)
            passed = f["float_worst_of_range"] <= MAX_OF_RANGE[attention]
            failed += not passed
            print(f"{name}: {len(x)} held-out sequences; accuracy float32 {f['float_accuracy']:.4f}, "
                  f"{args.activations} engine {f['engine_accuracy']:.4f}")
            print(f"  worst |error| vs float32: {f['float_worst_lsb']:.2f} steps = "
                  f"{100 * f['float_worst_of_range']:.2f}% of the output range {f['range']:.1f} "
                  f"[<= {100 * MAX_OF_RANGE[attention]:g}%: {'PASS' if passed else 'FAIL'}]; "
                  f"mean {f['float_mean_lsb']:.2f} steps = {100 * f['float_mean_of_range']:.3f}%")
            print(f"  split: engine vs exact simulation {f['engine_worst_lsb']:.2f} steps, simulation vs float32 "
                  f"{f['quantization_worst_lsb']:.2f} steps; every operator alone within "
                  f"{f['operator_worst_lsb']:.2f} step of exact")
            if args.activations == "int8":
                print(f"  with int16 activations on the same ranges (TFLite 16x8, simulated exactly): worst "
                      f"{100 * f['int16_worst_of_range']:.2f}% of the output range")
            print("  " + largest_roundings(model, graph, x))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
