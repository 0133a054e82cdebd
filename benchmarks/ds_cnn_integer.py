"""The DS-CNN keyword spotter in the integer engine (issue 16): accuracy against float32, and
batched throughput against LiteRT's interpreters, one process.

    .venv/bin/python benchmarks/ds_cnn_integer.py [--data ../shared/data] [--rounds 5]

Trains the CNN study's DS-CNN (15 epochs, seed 0, speaker ``lucas`` held out), folds its
BatchNorms, converts it with :func:`mixprec.integer.build.cnn.cnn_graph_from` (512 training
samples calibrate every tensor), in int8, in TFLite's 16x8 mode and in the int8/int16 mix
:func:`~mixprec.integer.build.mix.choose_activation_types` picks within ``--budget`` times the
int8 graph's activation arena (256 other training samples measure its sensitivities), and
scores the float32 model and the three graphs on the 500 held-out recordings. Each graph is exported to .tflite and run
in LiteRT: its reference
kernels (``BUILTIN_REF``, which must give the same bytes) and its default optimized kernels.
Samples per second on the 500 test inputs in one call: medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mixprec
from mixprec.integer import export_tflite
from mixprec.integer.build.cnn import cnn_graph_from
from mixprec.integer.build.mix import arena_bytes, choose_activation_types, graph_input
from mixprec.report.results import print_table
from mixprec.studies.cnn_models import DSCNN, per_sample_scores, seeded, spoken_digits_task, train
from mixprec.timing import interleaved_medians


def litert_runner(path: Path, inputs: np.ndarray, reference: bool):  # noqa: ANN201
    """A call running the whole batch through a LiteRT interpreter (reference or default kernels)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver,
                              num_threads=torch.get_num_threads())
    source = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(source, list(inputs.shape))
    interpreter.allocate_tensors()
    target = interpreter.get_output_details()[0]["index"]

    def run() -> np.ndarray:
        interpreter.set_tensor(source, inputs)
        interpreter.invoke()
        return interpreter.get_tensor(target)

    return run


def wide_layers(layers: list[nn.Module], types: tuple[str, ...]) -> str:
    """``index:Kind`` of the layers a mix made int16, or ``none``."""
    return ", ".join(f"{index}:{type(layer).__name__}" for index, (layer, kind) in enumerate(zip(layers, types))
                     if kind == "int16") or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data folder holding fsdd/")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.3, help="the searched mix's arena, x the int8 graph's")
    parser.add_argument("--latency-budget", type=float, default=1.3,
                        help="a second mix searched within this multiple of the int8 graph's measured time")
    args = parser.parse_args()
    task = spoken_digits_task(args.data, "lucas")
    model = train(seeded(DSCNN, 0), task, 15, 0)
    mixprec.fold_batchnorm(model)
    pick = torch.randperm(len(task.x_train), generator=torch.Generator().manual_seed(1))
    layers = [*model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head]
    labels = task.y_test.numpy()
    calls: dict = {"float32 PyTorch eager": lambda: model(task.x_test)}
    accuracy = {"float32": float(per_sample_scores(model, task.x_test, task.y_test)[0].mean())}
    same: dict[str, bool] = {}
    arenas: dict[str, int] = {}
    calibration, validation = task.x_train[pick[:512]], task.x_train[pick[512:768]]
    mix = choose_activation_types(layers, calibration, validation, budget=args.budget)
    timed = choose_activation_types(layers, calibration, validation, budget=args.latency_budget,
                                    latency_inputs=validation)
    graphs = {"int8": cnn_graph_from(layers, calibration), "16x8": cnn_graph_from(layers, calibration,
                                                                                 activations="int16"),
              f"searched mix ({args.budget}x int8 arena)": mix.graph,
              f"searched mix ({args.latency_budget}x int8 time)": timed.graph}
    print(f"searched mix: int16 activations for layers {wide_layers(layers, mix.types)}; int8 elsewhere")
    print(f"searched mix under the time budget: int16 for layers {wide_layers(layers, timed.types)}; "
          f"{1e3 * timed.seconds:.2f} ms against int8's {1e3 * timed.int8_seconds:.2f} ms on 256 validation samples")
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for index, (label, graph) in enumerate(graphs.items()):
            inputs = graph_input(graph, task.x_test)
            engine_out = graph(inputs)
            arenas[label] = arena_bytes(graph)
            path = Path(folder) / f"ds_cnn_{index}.tflite"
            export_tflite(graph, path)
            reference, optimized = litert_runner(path, inputs, True), litert_runner(path, inputs, False)
            same[label] = bool(np.array_equal(reference(), engine_out))
            accuracy[f"{label} engine"] = float((engine_out.argmax(1) == labels).mean())
            accuracy[f"{label} LiteRT default kernels"] = float((optimized().argmax(1) == labels).mean())
            calls.update({f"{label}: mixprec integer engine": lambda g=graph, i=inputs: g(i),
                          f"{label}: LiteRT BUILTIN_REF": reference, f"{label}: LiteRT default kernels": optimized})
        times = interleaved_medians(calls, args.rounds, 0.2)
    rows = [{"path": label, "samples_per_s": round(len(labels) / seconds, 1)} for label, seconds in times.items()]
    print_table(f"DS-CNN, 500 held-out recordings per call ({torch.get_num_threads()} threads)", rows,
                ("path", "samples_per_s"))
    print("accuracy: " + ", ".join(f"{name} {100 * value:.2f}%" for name, value in accuracy.items()))
    print("engine bytes == LiteRT BUILTIN_REF: " + ", ".join(f"{name} {value}" for name, value in same.items()))
    print("activation arena, bytes per sample: " + ", ".join(f"{name} {value:,}" for name, value in arenas.items()))


if __name__ == "__main__":
    main()
