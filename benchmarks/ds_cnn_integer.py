"""The DS-CNN keyword spotter in the integer engine (issue 16): accuracy against float32, and
batched throughput against LiteRT's interpreters, one process.

    .venv/bin/python benchmarks/ds_cnn_integer.py [--data ../shared/data] [--rounds 5]

Trains the CNN study's DS-CNN (15 epochs, seed 0, speaker ``lucas`` held out), folds its
BatchNorms, converts it with :func:`mixprec.integer.cnn_builder.cnn_graph_from` (512 training
samples calibrate every tensor), and scores the float32 model and the int8 graph on the 500
held-out recordings. The int8 graph is exported to .tflite and run in LiteRT: its reference
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
    graph = cnn_graph_from([*model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head],
                           task.x_train[pick[:512]])
    inputs = graph.inputs[0].quant.nearest_codes(task.x_test.permute(0, 2, 3, 1).numpy())
    labels = task.y_test.numpy()
    engine_out = graph(inputs)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ds_cnn.tflite"
        export_tflite(graph, path)
        reference, optimized = litert_runner(path, inputs, True), litert_runner(path, inputs, False)
        same = bool(np.array_equal(reference(), engine_out))
        with torch.no_grad():
            times = interleaved_medians({"float32 PyTorch eager": lambda: model(task.x_test),
                                         "mixprec integer engine (numpy)": lambda: graph(inputs),
                                         "LiteRT BUILTIN_REF": reference, "LiteRT default kernels": optimized},
                                        args.rounds, 0.2)
        litert_accuracy = float((optimized().argmax(1) == labels).mean())
    float_accuracy = float(per_sample_scores(model, task.x_test, task.y_test)[0].mean())
    rows = [{"path": label, "samples_per_s": round(len(inputs) / seconds, 1)} for label, seconds in times.items()]
    print_table(f"DS-CNN, 500 held-out recordings per call ({torch.get_num_threads()} threads)", rows,
                ("path", "samples_per_s"))
    print(f"accuracy: float32 {100 * float_accuracy:.2f}%, int8 engine "
          f"{100 * float((engine_out.argmax(1) == labels).mean()):.2f}%, LiteRT default kernels "
          f"{100 * litert_accuracy:.2f}%; engine bytes == LiteRT BUILTIN_REF: {same}")


if __name__ == "__main__":
    main()
