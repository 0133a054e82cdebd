"""torch.compile of quantized models: no graph break caused by mixprec, the eager model's bits."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mixprec
from mixprec.kernels import fake_ops, native

LINEAR_PRECISIONS = ["int8", "int8-static", "int8-asym", "w8", "w8g32", "w4", "w4a8", "bf16", "fp16"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


@pytest.mark.parametrize("precision", LINEAR_PRECISIONS)
def test_compiled_quantized_model_has_no_graph_break_and_the_eager_bits(precision: str) -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    torch.manual_seed(0)
    model = TinyModel().eval()
    ids = torch.randint(0, 50, (3, 5))
    embedding = {"int8-static": "int8", "int8-asym": "int8", "w4a8": "w4", "w8": "w8g32"}.get(precision, precision)
    policy = mixprec.Policy([("embed", embedding)], default=precision)
    calibration = [torch.randint(0, 50, (4, 5))] if precision == "int8-static" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16's emulated-GEMM note
        mixprec.quantize(model, policy, calibration=calibration)
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = model(ids), torch.compile(model)(ids)
    assert torch.equal(eager, compiled)


def test_compiled_int8_asym_reads_row_sums_kept_in_step_with_loaded_weights() -> None:
    """``int8-asym``'s zero-point term needs the weight's row sums; the compiled graph reads the ones cached when the
    codes were stored or loaded (not summed per call), so weights loaded after quantizing and compiled before any
    eager call still give the eager bits, and the graph holds no sum over the weight."""
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    torch.manual_seed(0)
    model, other = TinyModel().eval(), TinyModel().eval()
    policy = mixprec.Policy([("embed", "int8")], default="int8-asym")
    mixprec.quantize(model, policy)
    mixprec.quantize(other, policy)
    model.load_state_dict(other.state_dict())
    ids = torch.randint(0, 50, (3, 5))
    graphs = []

    def keep(graph: torch.fx.GraphModule, example_inputs: list) -> object:  # noqa: ARG001
        graphs.append(graph)
        return graph.forward

    with torch.no_grad():
        compiled = torch.compile(model, backend=keep)(ids)
        assert torch.equal(compiled, other(ids)) and torch.equal(compiled, model(ids))
    sums = [node for graph in graphs for node in graph.graph.nodes if node.op == "call_method" and node.target == "sum"
            or node.op == "call_function" and getattr(node.target, "__name__", "") == "sum"]
    assert not sums, sums


def test_compiled_int8_linear_with_a_prepacked_weight_has_the_eager_bits() -> None:
    # Weights of 2**22 elements or more hold oneDNN's prepacked weight and rescale its float32
    # accumulator in place (an operator that mutates its input, which torch.compile must
    # functionalize): the small models above never take that path.
    from mixprec.kernels import onednn_int8
    from mixprec.nn import Int8PackedLinear

    if not onednn_int8.prefer_packed(2048, 2048):
        pytest.skip("no oneDNN int8 packing on this machine")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048)).eval()
    mixprec.quantize(model, mixprec.Policy(default="int8"))
    assert isinstance(model[0], Int8PackedLinear)
    # 3 rows: mixprec's kernel reading the packed weight in place; 9 rows: oneDNN's GEMM.
    for rows in (3, 9):
        x = torch.randn(rows, 2048)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
        torch._dynamo.reset()
        with torch.no_grad():
            eager, compiled = model(x), torch.compile(model, dynamic=False)(x)
        assert torch.equal(eager, compiled)
        torch._dynamo.reset()


def test_every_native_operator_a_quantized_linear_calls_has_a_fake() -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    covered = set(fake_ops.register())
    for name in ("quantize_rows_s8", "quantize_rows_u8", "quantize_rows_static_s8", "quantize_rows_static_s8_t",
                 "quantize_samples_u8",
                 "int8_linear_dynamic", "w8_linear_rows", "w8g_linear_rows", "w4_linear_rows", "w4a8_linear",
                 "rescale_rows_cols", "rescale_rows_cols_", "tflite_conv2d", "tflite_sum_middle", "tflite_mean_middle",
                 "tflite_requantize", "tflite_fully_connected", "tflite_add",
                 "tflite_add_lookup", "tflite_add_fit", "tflite_quantize_nchw",
                 "tflite_dequantize"):
        assert name in covered
        assert torch._library.simple_registry.singleton.find(f"mixprec::{name}").fake_impl.kernel is not None


def _small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 8, 1),
                          nn.Flatten(), nn.Linear(8 * 36, 10)).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    return model


def test_compiled_static_int8_convolutions_are_one_graph_with_the_eager_bits() -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    model = _small_cnn()
    calibration = [torch.randn(8, 3, 6, 6)]
    mixprec.quantize(model, "int8-static", calibration=calibration)
    x = torch.randn(4, 3, 6, 6) * 1.5  # some values beyond the calibrated range: they saturate
    x[1, 0, 2, 2] = float("nan")
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        for batch in (x, x[[0, 2]], x[[3]]):  # new batch sizes recompile
            eager, traced = model(batch), compiled(batch)
            assert torch.equal(eager.isnan(), traced.isnan())
            assert torch.equal(eager.nan_to_num(), traced.nan_to_num())
    assert model(x)[1].isnan().all() and torch.isfinite(model(x)[[0, 2, 3]]).all()


def test_compiled_dynamic_int8_convolutions_run_outside_the_graph_with_the_eager_bits() -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    model = _small_cnn()
    mixprec.quantize(model, mixprec.Policy([("5", "int8")], default="bf16"))  # the 1x1 convolution
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(x), torch.compile(model)(x))


@pytest.mark.parametrize("precision", ["w8", "w4", "bf16"])
def test_compiled_convolutional_networks_have_no_graph_break(precision: str) -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    model = _small_cnn()
    x = torch.randn(4, 3, 6, 6)
    x[1, 0, 2, 2] = float("nan")  # one sample NaN: its output is NaN, the others untouched
    mixprec.quantize(model, precision)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = model(x), torch.compile(model)(x)
    # the weight-only convolutions are float convolutions on dequantized weights, which inductor
    # fuses its own way: measured <= 3.0e-8 on outputs up to 0.17 (bf16: the same bits)
    assert float((eager[[0, 2, 3]] - compiled[[0, 2, 3]]).abs().max()) <= 1e-7
    assert eager[1].isnan().all() and compiled[1].isnan().all() and torch.isfinite(eager[[0, 2, 3]]).all()
