"""The CNN study's two models against the int8 peers: speed at batch 1 and 64, and accuracy (issue 15).

    .venv/bin/python benchmarks/cnn.py [--models resnet8,dscnn] [--rounds 5] [--paths engine,PT2E,ONNX]
        [--out runs/cnn-bench]

Each model is trained as ``mixprec cnn-study`` trains it (same seed, epochs and data) and its
BatchNorms are folded. Then, in one process:

- PyTorch float32, eager and ``torch.compile``;
- mixprec eager: ``int8`` (dynamic activations), ``int8-static``, ``bf16`` and the searched
  policy at 0.6x uniform ``int8``'s bytes (the study's sensitivity metric on training samples);
  and ``int8-static`` under ``torch.compile`` (one graph; a static batch, one compile per batch
  size, as PT2E below: with freezing and a dynamic batch Inductor's int8 convolution lowering
  failed on a symbolic channel count);
- PT2E with torchao's ``X86InductorQuantizer`` (static int8, its defaults) compiled by
  Inductor with freezing (oneDNN int8 convolutions);
- the deprecated ``torch.ao`` FX flow (``x86`` qconfig mapping, static int8), eager;
- ONNX Runtime: the float32 ONNX export, and its static int8 (``quantize_static``, QDQ,
  per-channel weights), two intra-op threads;
- ONNX Runtime running mixprec's own ``int8``, ``int8-static`` and searched models exported with
  ``format="onnx"`` (``ConvInteger`` and mixprec's rescale: mixprec's outputs to the bit), two
  intra-op threads;
- mixprec's integer engine: the float model converted by ``cnn_graph_traced`` (int8, TFLite's
  arithmetic, calibrated on the same samples; residual ADDs included), run as one native program
  from float NCHW input to float logits (``run_float``: quantizing the input and dequantizing the
  output inside the call, and timed).

Every static path calibrates on the same 512 training samples. Milliseconds per batch are
medians over rounds; each round runs every path for a block of calls of at least 0.2 s,
in rotating order, each block after a pause of 50 ms and one untimed call: ONNX Runtime's and
OpenMP's threads spin after a call, and without the pause a block that followed ONNX Runtime's ran
up to 2.5x slower here (measured: the integer engine's ResNet-8 batch of 64 alternating between
2.5 and 6.5 ms per call for a whole block). Needs the extras ``bench`` (torchao) and ``onnx``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import mixprec
from mixprec.analysis import search, sensitivity, uniform_bytes
from mixprec.integer.build.mix import run_float
from mixprec.integer.build.traced import cnn_graph_traced
from mixprec.report.results import print_table, write_csv
from mixprec.studies.cnn import CANDIDATES, MODELS, CnnStudyConfig
from mixprec.studies.cnn_models import Task, per_sample_scores, seeded, train
from mixprec.timing import SPIN_SETTLE_SECONDS, interleaved_medians

PATH_LABELS = ("float32 eager", "mixprec int8", "mixprec int8-static", "mixprec bf16",
               "mixprec int8-static torch.compile", "mixprec searched 0.6x int8 bytes", "float32 torch.compile",
               "PT2E + Inductor int8", "torch.ao FX int8 (x86)", "mixprec integer engine int8 (TFLite arithmetic)",
               "ONNX Runtime float32", "ONNX Runtime static int8", "ONNX Runtime, mixprec int8 export",
               "ONNX Runtime, mixprec int8-static export", "ONNX Runtime, mixprec searched 0.6x export")
COLUMNS = ("model", "path", "accuracy", "ms_b1", "ms_b64", "speedup_b1", "speedup_b64")


class Pt2eInductor:
    """PT2E static int8 with the X86 Inductor quantizer, compiled with freezing: one export per
    batch size, each calibrated on the same samples (with a dynamic batch, Inductor's int8
    convolution lowering failed here: a stride assertion on the first convolution)."""

    def __init__(self, model: nn.Module, calibration: list[torch.Tensor]) -> None:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        self.model, self.samples = model, torch.cat(calibration)
        self.compiled: dict[int, Callable] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in self.compiled:
            self.compiled[x.shape[0]] = self._build(x.shape[0])
        return self.compiled[x.shape[0]](x)

    def _build(self, batch: int) -> Callable:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        exported = torch.export.export(copy.deepcopy(self.model), (self.samples[:batch],)).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for start in range(0, len(self.samples) - batch + 1, batch):
                prepared(self.samples[start:start + batch])
        return torch.compile(convert_pt2e(prepared))


def fx_int8(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    """The deprecated torch.ao FX flow: static int8 with the x86 qconfig mapping."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for batch_x in calibration:
            prepared(batch_x)
    return convert_fx(prepared)


def float_export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float32 model as ONNX (input ``x``, batch dynamic)."""
    torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def ort_static(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], folder: Path) -> Callable:
    """ONNX Runtime static int8 (QDQ, per-channel weights) of the float32 export."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path, int8_path = float_export(model, example, folder / "float.onnx"), folder / "int8.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": b.numpy()} for b in calibration])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return ort_session(int8_path, "x")


def ort_session(path: Path, input_name: str) -> Callable:
    """``x -> logits`` through an ONNX Runtime CPU session with as many intra-op threads as PyTorch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


def ort_mixprec(model: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    """mixprec's quantized ``model`` exported with ``format="onnx"``, run by ONNX Runtime."""
    return ort_session(mixprec.export(model, path, format="onnx", example=example[:1]), "input")


class IntegerEngine:
    """A float CNN through mixprec's integer engine in int8 (:func:`cnn_graph_traced`): float NCHW in,
    float logits out."""

    def __init__(self, model: nn.Module, calibration: list[torch.Tensor]) -> None:
        self.graph = cnn_graph_traced(model, torch.cat(calibration))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run_float(self.graph, x)


def run_model(name: str, config: CnnStudyConfig, rounds: int, only: list[str] | None = None) -> list[dict[str, object]]:
    title, make_task, make_model, epochs_of, batch_size = MODELS[name]
    task: Task = make_task(config)
    fp32 = train(seeded(make_model, config.seed), task, epochs_of(config), config.seed, batch_size)
    mixprec.fold_batchnorm(fp32)
    pick = torch.randperm(len(task.x_train), generator=torch.Generator().manual_seed(config.seed + 1))
    calibration = list(task.x_train[pick[: config.calibration_samples]].split(128))
    sample = list(task.x_train[pick[: config.sensitivity_samples]].split(128))
    batch64, batch1 = task.x_test[:64], task.x_test[:1]

    def quantized(precision: str) -> nn.Module:
        model = copy.deepcopy(fp32)
        mixprec.quantize(model, precision, calibration=calibration)
        return model

    def searched() -> nn.Module:
        table = sensitivity(fp32, sample, CANDIDATES, metric=config.sensitivity_metric, progress=False)
        return quantized(search(fp32, table, budget_bytes=int(0.6 * uniform_bytes(fp32, "int8"))).policy)

    folder = tempfile.TemporaryDirectory()
    builders: dict[str, Callable[[], Callable]] = {
        "float32 eager": lambda: fp32,
        "mixprec int8": lambda: quantized("int8"),
        "mixprec int8-static": lambda: quantized("int8-static"),
        "mixprec bf16": lambda: quantized("bf16"),
        "mixprec int8-static torch.compile": lambda: torch.compile(quantized("int8-static"), dynamic=False),
        "mixprec searched 0.6x int8 bytes": searched,
        "float32 torch.compile": lambda: torch.compile(copy.deepcopy(fp32)),
        "PT2E + Inductor int8": lambda: Pt2eInductor(fp32, calibration),
        "torch.ao FX int8 (x86)": lambda: fx_int8(fp32, batch64, calibration),
        "mixprec integer engine int8 (TFLite arithmetic)": lambda: IntegerEngine(fp32, calibration),
        "ONNX Runtime float32": lambda: ort_session(float_export(fp32, batch64, Path(folder.name) / "f32.onnx"), "x"),
        "ONNX Runtime static int8": lambda: ort_static(fp32, batch64, calibration, Path(folder.name)),
        "ONNX Runtime, mixprec int8 export": lambda: ort_mixprec(quantized("int8"), batch64,
                                                                 Path(folder.name) / "mixprec-int8.onnx"),
        "ONNX Runtime, mixprec int8-static export": lambda: ort_mixprec(
            quantized("int8-static"), batch64, Path(folder.name) / "mixprec-int8-static.onnx"),
        "ONNX Runtime, mixprec searched 0.6x export": lambda: ort_mixprec(
            searched(), batch64, Path(folder.name) / "mixprec-searched.onnx"),
    }
    if tuple(builders) != PATH_LABELS:
        raise RuntimeError("PATH_LABELS must name run_model's paths, in order")
    paths = {label: build() for label, build in builders.items()
             if label == "float32 eager" or only is None or any(part.lower() in label.lower() for part in only)}
    with folder:
        with torch.no_grad():
            accuracy = {label: 100.0 * float(per_sample_scores(path, task.x_test, task.y_test)[0].mean())
                        for label, path in paths.items()}
            b64 = interleaved_medians({k: (lambda p=p: p(batch64)) for k, p in paths.items()}, rounds, 0.2,
                                      settle_seconds=SPIN_SETTLE_SECONDS)
            b1 = interleaved_medians({k: (lambda p=p: p(batch1)) for k, p in paths.items()}, rounds, 0.2,
                                     settle_seconds=SPIN_SETTLE_SECONDS)
    return [{"model": f"{title} ({task.name})", "path": label, "accuracy": round(accuracy[label], 2),
             "ms_b1": round(b1[label] * 1e3, 3), "ms_b64": round(b64[label] * 1e3, 3),
             "speedup_b1": round(b1["float32 eager"] / b1[label], 2),
             "speedup_b64": round(b64["float32 eager"] / b64[label], 2)} for label in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet8,dscnn", help="comma-separated (default: %(default)s)")
    parser.add_argument("--data", help="data folder holding fashion-mnist/ and fsdd/")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--paths", help="comma-separated parts of path names to time (float32 eager always runs, "
                                        "the baseline); default: every path")
    parser.add_argument("--out", default="runs/cnn-bench")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    config = CnnStudyConfig(data=args.data)
    only = args.paths.split(",") if args.paths else None
    for part in only or []:
        if not any(part.lower() in label.lower() for label in PATH_LABELS):
            parser.error(f"--paths: {part!r} names none of the paths {list(PATH_LABELS)}")
    rows = [row for name in args.models.split(",") for row in run_model(name, config, args.rounds, only)]
    print_table(f"CNN inference, torch {torch.__version__}, {torch.get_num_threads()} threads", rows, COLUMNS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "cnn.csv", rows, COLUMNS)
    print(f"wrote {out / 'cnn.csv'}")


if __name__ == "__main__":
    main()
