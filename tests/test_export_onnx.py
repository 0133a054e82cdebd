"""ONNX export: ONNX Runtime runs BERT-style encoders and MLPs in every exportable precision and
matches mixprec's outputs (int8 layers step for step); bad input refused, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_runtime_int8 import needs_exact_int8

import mixprec
from mixprec import ExportError, Policy

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def tokens() -> dict[str, torch.Tensor]:
    """A batch other than the tracing example: other shape, padding in one row."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 120, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def run_both(model: torch.nn.Module, path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = tokens()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {name: value.numpy() for name, value in batch.items()})[0]
    with torch.no_grad():
        ours = model(**batch).last_hidden_state.numpy()
    return ours, theirs


@pytest.mark.parametrize(("precision", "tolerance"), [
    # measured: 4.8e-7 for fp32, int8, int8-static, w8g32, w4g32, 7.2e-7 int8-asym (float rounding in the float ops
    # ONNX Runtime runs its own way); w8 9.5e-7; fp16 5.4e-5 (half GEMM accumulation order); w4a8g32 4.8e-7
    ("fp32", 2e-6), pytest.param("int8", 2e-6, marks=needs_exact_int8),
    pytest.param("int8-static", 2e-6, marks=needs_exact_int8), pytest.param("int8-asym", 2e-6, marks=needs_exact_int8),
    ("w8", 2e-6), ("w8g32", 2e-6),
    ("w4g32", 2e-6), ("w4g64", 2e-6), ("fp16", 2e-4), ("w4a8g32", 2e-6),
])
def test_onnx_runtime_runs_each_linear_precision(precision: str, tolerance: float, tmp_path: Path) -> None:
    model = tiny_bert()
    calibration = [tokens()] if precision == "int8-static" else None
    mixprec.quantize(model, Policy([(r"encoder\..*", precision)]), calibration=calibration)
    ours, theirs = run_both(model, mixprec.export(model, tmp_path / "m.onnx", format="onnx"))
    assert np.abs(ours - theirs).max() <= tolerance


@needs_exact_int8
@pytest.mark.parametrize("precision", ["int8", "int8-asym"])
def test_int8_layers_are_mixprecs_arithmetic(precision: str, tmp_path: Path) -> None:
    """One int8 Linear alone: ONNX Runtime's output is mixprec's to the bit (int8-asym: with
    every graph optimization on, which fuses it into ONNX Runtime's own DynamicQuantizeMatMul)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40))
    mixprec.quantize(model, Policy(default=precision))
    x = torch.randn(64, 96) * torch.logspace(-3, 2, 64).unsqueeze(1) + 0.3
    path = mixprec.export(model, tmp_path / "m.onnx", format="onnx", example=x[:1])
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"input": x.numpy()})[0]
    assert np.array_equal(theirs, model(x).detach().numpy())
    if precision == "int8-asym":
        assert [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node] == \
            ["DynamicQuantizeMatMul"]


def test_w4a8_layers_round_activations_as_mixprec_does(tmp_path: Path) -> None:
    """One w4a8g32 Linear alone, inputs spanning five decades: ONNX Runtime rounds each row to
    mixprec's int8 codes, so the outputs differ by float32 summation order only (ONNX Runtime's
    own int8 compute, accuracy_level 4, rounds per block of 32 and was 1e-3 off)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40))
    mixprec.quantize(model, Policy(default="w4a8g32"))
    x = torch.randn(64, 96) * torch.logspace(-3, 2, 64).unsqueeze(1) + 0.3
    path = mixprec.export(model, tmp_path / "m.onnx", format="onnx", example=x[:1])
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    ours = model(x).detach().numpy()
    scale = np.abs(ours).max(1, keepdims=True)
    # measured: 5.9e-7 of a row's largest output (float32 sums of up to 96 products in another order)
    assert (np.abs(theirs - ours) / scale).max() <= 1e-6
    assert "MatMulNBits" in [node.op_type for node in onnx.load(path).graph.node]


@pytest.mark.parametrize("precision", ["int8", "w4", "w4g32", "fp16", "bf16"])
def test_quantized_embeddings_trace_as_they_run(precision: str, tmp_path: Path) -> None:
    model = tiny_bert()
    mixprec.quantize(model, Policy([(r"embeddings\..*_embeddings", precision)]))
    ours, theirs = run_both(model, mixprec.export(model, tmp_path / "m.onnx", format="onnx"))
    assert np.abs(ours - theirs).max() <= 2e-6  # measured 4.8e-7 - 7.2e-7


@needs_exact_int8
def test_mlp_with_an_example_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    mixprec.quantize(mlp, Policy([("0", "int8"), ("2", "w4g32")]))
    x = torch.randn(7, 784)
    path = mixprec.export(mlp, tmp_path / "mlp.onnx", format="onnx", example=x[:1])
    theirs = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert np.abs(theirs - mlp(x).detach().numpy()).max() <= 1e-6  # measured 1.2e-7


def test_refusals(tmp_path: Path) -> None:
    model = tiny_bert()
    mixprec.quantize(model, Policy([(r"encoder\.layer\.0\..*", "bf16"), (r"encoder\.layer\.1\..*", "w4g8")]))
    with pytest.raises(ExportError, match=r"'encoder\.layer\.0\.attention\.self\.query' \(linear, bf16\): use fp16") \
            as err:
        mixprec.export(model, tmp_path / "m.onnx", format="onnx")
    assert "(linear, w4g8): use w4g32 or w4g64 (MatMulNBits blocks)" in str(err.value)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(ExportError, match="needs example=<an input tensor>"):
        mixprec.export(mlp, tmp_path / "m.onnx", format="onnx")
    with pytest.raises(ExportError, match="traced with its own example tokens; drop example="):
        mixprec.export(tiny_bert(), tmp_path / "m.onnx", format="onnx", example=torch.ones(1, 8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Exception, match="8"):  # a wrong example shape: the trace fails, nothing is left behind
        mixprec.export(mlp, tmp_path / "m.onnx", format="onnx", example=torch.ones(1, 5))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["int8", "int8-static", "int8-asym", "w8", "w8g32", "w4g32", "w4a8g32", "fp16"])
def test_the_file_holds_each_precisions_storage_not_float32_weights(precision: str, tmp_path: Path) -> None:
    """The exporter's constant folding must not widen stored codes into float32 initializers
    (it did for ``w8``: 4x the bytes). The file's initializers hold at most mixprec's bytes plus
    the float32 widening of fp16 group scales (MatMulNBits takes float32 scales) and a few scalars."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128))
    x = torch.randn(4, 256)
    report = mixprec.quantize(model, Policy(default=precision),
                              calibration=[x] if precision == "int8-static" else None)
    path = mixprec.export(model, tmp_path / "m.onnx", format="onnx", example=x[:1])
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)
    widened_scales = 2 * 128 * 256 // 32 if "g32" in precision else 0
    assert stored <= report.total_bytes + widened_scales + 64, (stored, report.total_bytes)
