"""The DS-CNN keyword spotter in the integer engine (issue 16): accuracy against float32, and
batched throughput against LiteRT's interpreters, one process.

    .venv/bin/python benchmarks/ds_cnn_integer.py [--data ../shared/data] [--rounds 5]

Trains the CNN study's DS-CNN (15 epochs, seed 0, speaker ``lucas`` held out), folds its
BatchNorms, converts it with :func:`mixprec.integer.build.cnn.cnn_graph_from` (512 training
samples calibrate every tensor), in int8 and in TFLite's 16x8 mode, and scores the float32
model and both graphs on the 500 held-out recordings. Each graph is exported to .tflite and run
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data folder holding fsdd/")
    parser.add_argument("--rounds", type=int, default=5)
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
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for kind, label in (("int8", "int8"), ("int16", "16x8")):
            graph = cnn_graph_from(layers, task.x_train[pick[:512]], activations=kind)
            inputs = graph.inputs[0].quant.nearest_codes(task.x_test.permute(0, 2, 3, 1).numpy(), kind)
            engine_out = graph(inputs)
            path = Path(folder) / f"ds_cnn_{kind}.tflite"
            export_tflite(graph, path)
            reference, optimized = litert_runner(path, inputs, True), litert_runner(path, inputs, False)
            same[label] = bool(np.array_equal(reference(), engine_out))
            accuracy[f"{label} engine"] = float((engine_out.argmax(1) == labels).mean())
            accuracy[f"{label} LiteRT default kernels"] = float((optimized().argmax(1) == labels).mean())
            calls.update({f"{label}: mixprec integer engine (numpy)": lambda g=graph, i=inputs: g(i),
                          f"{label}: LiteRT BUILTIN_REF": reference, f"{label}: LiteRT default kernels": optimized})
        times = interleaved_medians(calls, args.rounds, 0.2)
    rows = [{"path": label, "samples_per_s": round(len(labels) / seconds, 1)} for label, seconds in times.items()]
    print_table(f"DS-CNN, 500 held-out recordings per call ({torch.get_num_threads()} threads)", rows,
                ("path", "samples_per_s"))
    print("accuracy: " + ", ".join(f"{name} {100 * value:.2f}%" for name, value in accuracy.items()))
    print("engine bytes == LiteRT BUILTIN_REF: " + ", ".join(f"{name} {value}" for name, value in same.items()))

if __name__ == "__main__":
    main()
