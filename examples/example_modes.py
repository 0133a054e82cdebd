"""The run / bench / golden / plot modes shared by the integer-engine examples.

Artifacts live in ``examples/goldens/<name>.safetensors`` (the trained float weights) and
``examples/goldens/<name>.int8`` (the pipeline's int8 outputs on the held-out set, row-major
bytes). ``golden`` trains and writes both; the other modes use the stored weights when present
(so every mode measures the same model), else train.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mixprec import Policy
from mixprec.integer.build.mix import choose_wide
from mixprec.integer.core.profile import stage_table
from mixprec.integer.models.kws import KWS_STAGES, KeywordSpotter, build_pipeline, parity
from mixprec.io_utils import atomic_path
from mixprec.qat import prepare_qat, to_float

GOLDENS = Path(__file__).resolve().parent / "goldens"
#: Issue 4's parity targets for the keyword spotter: worst error in output steps and of the range.
MAX_LSB, MAX_OF_RANGE = 1.0, 0.001
#: Issue 16's target for the 16x8 pipeline against float32, as a fraction of the output range (an
#: int16 output step is far below the half island's own rounding, so steps are no measure there).
MAX_OF_RANGE_16X8 = 0.0015


def load_model(name: str, make: Callable[[], KeywordSpotter]) -> KeywordSpotter:
    """The stored weights of example ``name`` in a fresh model from ``make``."""
    model = make()
    model.load_state_dict(load_file(GOLDENS / f"{name}.safetensors"))
    return model.eval()


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
        batch: int) -> None:
    """Cross-entropy training on random batches (generator seeded 0); logits and labels are
    flattened so per-token heads train the same way. Leaves the model in eval mode."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (batch,), generator=generator)
        logits = model(x[rows])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[rows].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def fine_tune_on_grid(model: torch.nn.Module, policy: Policy, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Quantization-aware fine-tuning: ``mixprec.prepare_qat(model, policy)``, then :func:`fit`
    (Adam, lr 3e-4, ``steps`` steps of 256 samples), then ``mixprec.qat.to_float``: the float
    model keeps the rounded weights, which the engine's builders find on their grids again."""
    prepare_qat(model, policy)
    fit(model, x, y, torch.optim.Adam(model.parameters(), lr=3e-4), steps=steps, batch=256)
    to_float(model)


def stored_model(name: str, make_model: Callable[[], torch.nn.Module], train: Callable[[torch.nn.Module], None],
                 retrain: bool) -> torch.nn.Module:
    """The stored model of example ``name``; trained (and stored) first when ``retrain`` or
    when nothing is stored yet."""
    weights = GOLDENS / f"{name}.safetensors"
    if retrain or not weights.exists():
        model = make_model()
        train(model)
        GOLDENS.mkdir(exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return load_model(name, make_model)


def write_golden(name: str, codes: np.ndarray) -> None:
    """Store the output codes' bytes of example ``name`` (``<name>.int8``, or ``.int16`` in 16x8,
    little-endian)."""
    path = GOLDENS / f"{name}.{codes.dtype.name}"
    codes = codes.astype(codes.dtype.newbyteorder("<"))
    with atomic_path(path) as tmp:
        tmp.write_bytes(codes.tobytes())
    print(f"wrote {path} ({codes.nbytes} bytes)")


def run_modes(name: str, make_model: Callable[[], KeywordSpotter], train: Callable[[KeywordSpotter], None],
              calibration: torch.Tensor, held_out: torch.Tensor, labels: torch.Tensor,
              argv: list[str] | None = None, training: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Parse ``argv`` and run one mode; ``train`` trains a fresh ``make_model()`` in place;
    ``training`` (features, labels) is what ``--qat-steps`` fine-tunes on."""
    parser = argparse.ArgumentParser(prog=name, description=f"{name}: the integer engine's keyword spotter")
    parser.add_argument("mode", choices=["run", "bench", "golden", "plot"])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="the half island")
    parser.add_argument("--activations", choices=["int8", "int16", "mix"], default="int8",
                        help="the integer stages' activations: int8, int16 (TFLite's 16x8 mode), or the mix "
                             "mixprec.integer.build.mix.choose_wide picks per stage within --budget")
    parser.add_argument("--budget", type=float, default=1.3,
                        help="mix: the activation arena allowed, as a multiple of the int8 pipeline's (default 1.3)")
    parser.add_argument("--batch", type=int, default=4096, help="bench: samples per batch")
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help="bench/plot output folder")
    parser.add_argument("--qat-steps", type=int, default=0,
                        help="run/plot: first fine-tune this many steps with the weights on their grids (mixprec QAT: "
                             "frontend and classifier on int8, the attention on the half island's type)")
    args = parser.parse_args(argv)
    if args.qat_steps < 0 or (args.qat_steps and (training is None or args.mode not in ("run", "plot"))):
        parser.error("--qat-steps takes a count >= 0, with the run or plot mode")
    if args.activations == "mix" and (args.mode == "golden" or not args.budget >= 1.0):
        parser.error("--activations mix takes a --budget >= 1.0, and no golden mode (goldens are int8 or int16)")
    model = stored_model(name, make_model, train, retrain=args.mode == "golden")
    if args.qat_steps:
        half = "fp16" if args.dtype == "float16" else "bf16"
        fine_tune_on_grid(model, Policy([(r"attention\..*", half)], default="w8"), *training, args.qat_steps)
    if args.activations == "mix":
        pipeline = searched_pipeline(model, calibration, args.dtype, args.budget)
    else:
        pipeline = build_pipeline(model, calibration, args.dtype, args.activations)
    if args.mode == "golden":
        write_golden(name, pipeline.run_codes(held_out.numpy()))
        return 0
    if args.mode == "run":
        return report_parity(pipeline, model, held_out, labels)
    if args.mode == "bench":
        return bench(pipeline, held_out, args.batch, args.out)
    return plot(pipeline, model, held_out, args.out, name)


def searched_pipeline(model: KeywordSpotter, calibration: torch.Tensor, dtype: str, budget: float):  # noqa: ANN201
    """The int8 / int16 choice per integer stage (:data:`~mixprec.integer.models.kws.KWS_STAGES`)
    that :func:`~mixprec.integer.build.mix.choose_wide` picks within ``budget`` times the int8
    pipeline's arena, by each stage's effect on the output's mean squared error against the float
    model over the first 1,024 calibration samples."""
    sample = calibration[:1024]
    with torch.no_grad():
        reference = model.double()(sample.double()).numpy()
    model.float()

    def error(pipeline) -> float:  # noqa: ANN001
        return float(np.mean((pipeline.run_float(sample.numpy()) - reference) ** 2))

    def build(wide: frozenset):  # noqa: ANN202
        return build_pipeline(model, calibration, dtype, dict.fromkeys(wide, "int16"))

    choice = choose_wide(KWS_STAGES, build, error, budget, cost=lambda pipeline: pipeline.arena_bytes())
    print(f"searched mix: int16 for {', '.join(choice.wide) or 'nothing'}; arena {choice.arena:,} B per sample = "
          f"{choice.arena / choice.int8_arena:.2f}x int8's {choice.int8_arena:,} B (all int16: "
          f"{build_pipeline(model, calibration, dtype, 'int16').arena_bytes():,} B)")
    return choice.graph


def report_parity(pipeline, model: KeywordSpotter, held_out: torch.Tensor, labels: torch.Tensor) -> int:  # noqa: ANN001
    """Print accuracy and both parities; PASS when the engine's own error meets the targets."""
    figures = parity(pipeline, model, held_out)
    with torch.no_grad():
        float_accuracy = float((model(held_out).argmax(-1) == labels).float().mean())
    mixed = pipeline.run_float(held_out.numpy()).argmax(-1)
    mixed_accuracy = float((torch.from_numpy(mixed) == labels).float().mean())
    print(f"held-out samples: {len(held_out)}; output step {figures['step']:.5f}, float output range "
          f"{figures['range']:.3f}")
    print(f"accuracy: float32 {float_accuracy:.4f}, {pipeline.input_kind}/half pipeline {mixed_accuracy:.4f}; "
          f"argmax agreement {figures['agreement']:.4f}")
    verdicts = []
    for label, title in (("engine", "engine vs exact simulation of the quantized model"),
                         ("float", "pipeline vs the float32 model (adds the quantization error)")):
        lsb, of_range = figures[f"{label}_worst_lsb"], figures[f"{label}_worst_of_range"]
        lsb_ok, range_ok = lsb <= MAX_LSB + 1e-4, of_range <= MAX_OF_RANGE
        verdicts.append(lsb_ok)
        print(f"{title}: worst {figures[f'{label}_worst']:.5f} = {lsb:.3f} steps "
              f"[<= {MAX_LSB}: {'PASS' if lsb_ok else 'FAIL'}] = {100 * of_range:.3f}% of range "
              f"[<= {100 * MAX_OF_RANGE}%: {'PASS' if range_ok else 'FAIL'}]")
        if label == "float" and not (lsb_ok and range_ok) and pipeline.stages[-1].output_kind == "int8":
            print("  (the % FAILs are expected with int8 activations: half a step of an int8 output grid spanning "
                  "the range is already 0.196% of it; the exit code follows the engine's parity in steps, <= 1 "
                  "step; int16 activations, below, are what can meet the float target)")
    print(f"outputs differing from the simulation: {100 * figures['engine_differing']:.2f}%; saturated at the "
          f"calibrated range's ends: {100 * figures['saturated']:.2f}% (worst error among the rest "
          f"{figures['float_worst_unsaturated_lsb']:.3f} steps vs float32)")
    print(f"with int16 activations on the same ranges (TFLite 16x8, simulated exactly): worst "
          f"{100 * figures['int16_worst_of_range']:.3f}% of range vs float32")
    if pipeline.output_quant is not None and pipeline.stages[-1].output_kind == "int16":
        met = figures["float_worst_of_range"] <= MAX_OF_RANGE_16X8
        print(f"16x8 target, pipeline vs float32: {100 * figures['float_worst_of_range']:.3f}% of range "
              f"[<= {100 * MAX_OF_RANGE_16X8}%: {'PASS' if met else 'FAIL'}] (the exit code follows this one)")
        return 0 if met else 1
    return 0 if verdicts[0] else 1


def bench(pipeline, held_out: torch.Tensor, batch: int, out: Path) -> int:  # noqa: ANN001
    repeats = -(-batch // len(held_out))
    x = np.concatenate([pipeline.quantize_input(held_out.numpy())] * repeats)[:batch]
    profiles = pipeline.profile(x, repeats=5)
    table = stage_table(profiles)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "stages.csv") as tmp:
        tmp.write_text(table)
    print(table, end="")
    start = time.perf_counter()
    pipeline(x)
    seconds = time.perf_counter() - start
    print(f"whole pipeline, batch {batch}: {seconds * 1e3:.2f} ms = {batch / seconds:,.0f} samples/s")
    return 0


def plot(pipeline, model: KeywordSpotter, held_out: torch.Tensor, out: Path, name: str = "") -> int:  # noqa: ANN001
    with torch.no_grad():
        reference = model(held_out).numpy().ravel()
    title = f"{name}: {pipeline.input_kind} stages, {pipeline.stages[2].dtype} island, {len(held_out)} held-out"
    plot_parity(reference, pipeline.run_float(held_out.numpy()).ravel(), float(pipeline.output_quant.scale32[0]),
                out / f"parity_{pipeline.input_kind}.png", title)
    return 0


def plot_parity(reference: np.ndarray, got: np.ndarray, step: float, path: Path, title: str) -> None:
    """Scatter of float vs dequantized engine outputs against the line y = x, and the absolute
    error per element against one output step; ``title`` names the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    figure.suptitle(title)
    ends = [float(min(reference.min(), got.min())), float(max(reference.max(), got.max()))]
    left.plot(ends, ends, color="grey", linewidth=0.8, label="y = x")
    left.scatter(reference, got, s=2, label="outputs")
    left.set(xlabel="float32 output", ylabel="integer engine output (dequantized)", title="float vs engine")
    left.legend(loc="upper left", fontsize="small")
    right.plot(np.abs(got - reference), ".", markersize=2, label="|error|")
    right.axhline(step, color="red", label="one output step")
    right.set(xlabel="output element", ylabel="|error|", title="absolute error per element")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")  # below: data stays clear
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path}")
