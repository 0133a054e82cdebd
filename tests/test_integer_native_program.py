"""The native program (a graph's operators in one call): the same codes as running the operators one
by one, which graphs convert and which stay per operator, and malformed programs refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mixprec
from mixprec import InputError
from mixprec.integer import FullyConnectedNode, Graph, Quantization, ReshapeNode, TensorSpec
from mixprec.integer.build.cnn import cnn_graph_from
from mixprec.integer.build.mix import graph_input, run_float
from mixprec.integer.build.traced import cnn_graph_traced
from mixprec.kernels import native
from mixprec.studies.cnn_models import DSCNN, ResNet8

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.load_error()}")


def test_a_resnet8_runs_as_one_program_with_the_operators_codes() -> None:
    """Convolutions (a PAD applied by the stride-2 convolution), residual ADDs (each finished by a
    convolution), MEAN and FULLY_CONNECTED, at batch sizes 1, 3 and 64."""
    torch.manual_seed(0)
    model = ResNet8().eval()
    mixprec.fold_batchnorm(model)
    graph = cnn_graph_traced(model, torch.rand(128, 1, 28, 28))
    assert "PAD" in [node.opcode for node in graph.nodes] and graph.native_program is not None
    # each residual ADD is finished by the convolution computed last of its two operands
    assert [node.opcode for node in graph.nodes].count("ADD") == 3
    assert "mixprec::tflite_add_lookup" not in graph.native_program.ops
    for batch in (1, 3, 64):
        codes = graph_input(graph, torch.rand(batch, 1, 28, 28))
        assert np.array_equal(graph(codes), graph.run_each(codes)), batch
    with pytest.raises(InputError, match="must be a numpy array of int8"):
        graph.run_each(codes.astype(np.int16))


def test_float_in_float_out_runs_as_one_program_with_the_same_values() -> None:
    """run_float: the float program (input quantized, output dequantized inside the call) gives the
    float32 values of graph_input, the graph and values_of, at batch 1 and 17; bad input refused."""
    torch.manual_seed(4)
    model = ResNet8().eval()
    mixprec.fold_batchnorm(model)
    graph = cnn_graph_traced(model, torch.rand(64, 1, 28, 28))
    assert graph.native_float_program is not None
    for batch in (1, 17):
        x = torch.rand(batch, 1, 28, 28) * 1.2 - 0.1  # some values past the calibrated range
        expected = graph.output_quant.values_of(graph.run_each(graph_input(graph, x))).astype(np.float32)
        got = run_float(graph, x)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected), batch
        # an input that requires grad, and one that is not contiguous (every other column of a wider one)
        assert np.array_equal(run_float(graph, x.clone().requires_grad_()).numpy(), expected), batch
        wide = torch.zeros(batch, 1, 28, 56)
        wide[..., ::2] = x
        assert not wide[..., ::2].is_contiguous()
        assert np.array_equal(run_float(graph, wide[..., ::2]).numpy(), expected), batch
    assert np.array_equal(run_float(graph, x.double()).numpy(), expected)  # float64: through graph_input
    with pytest.raises(InputError, match=r"NCHW images of \(1, 28, 28\)"):
        run_float(graph, torch.rand(2, 28, 28, 1))
    with pytest.raises(InputError, match="takes a float NCHW tensor"):
        run_float(graph, torch.zeros(2, 1, 28, 28, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="contiguous int8 or int16 tensor"):
        native.tflite_dequantize(torch.zeros(3, dtype=torch.int32), 0.5, 0)
    with pytest.raises(RuntimeError, match="contiguous float32 NCHW tensor"):
        native.tflite_quantize_nchw(torch.zeros(2, 3), 0.5, 0, False)
    flat = Graph((TensorSpec("x", (1, 12), Quantization.per_tensor(0.05)),), (ReshapeNode((0,), (3, 4)),))
    assert flat.native_float_program is None
    with pytest.raises(InputError, match="graphs of one NHWC image input"):
        run_float(flat, torch.rand(2, 1, 3, 4))


def test_a_mixed_int8_int16_chain_runs_as_one_program() -> None:
    """QUANTIZE between int8 and int16 grids, 16x8 convolutions, an int8 MEAN and FULLY_CONNECTED."""
    torch.manual_seed(1)
    model = DSCNN(width=16, blocks=2).eval()
    mixprec.fold_batchnorm(model)
    layers = [*model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head]
    kinds = ["int16" if index < 6 else "int8" for index in range(len(layers))]
    graph = cnn_graph_from(layers, torch.randn(64, 1, 49, 10), activations=kinds)
    assert "QUANTIZE" in [node.opcode for node in graph.nodes] and graph.native_program is not None
    codes = graph_input(graph, torch.randn(5, 1, 49, 10))
    assert np.array_equal(graph(codes), graph.run_each(codes))


def test_reshapes_and_a_rank3_fully_connected_run_as_one_program() -> None:
    rng = np.random.default_rng(2)
    weights = rng.integers(-127, 128, (6, 4)).astype(np.int8)
    fc = FullyConnectedNode((1,), weights, Quantization.per_tensor(0.01), None, Quantization.per_tensor(0.2, 3))
    graph = Graph((TensorSpec("x", (1, 12), Quantization.per_tensor(0.05, -2)),),
                  (ReshapeNode((0,), (3, 4)), fc, ReshapeNode((2,), (18,))))
    assert graph.native_program is not None
    x = rng.integers(-128, 128, (7, 12)).astype(np.int8)
    assert np.array_equal(graph(x), graph.run_each(x))


def test_graphs_with_an_operator_without_a_native_kernel_run_per_operator() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    graph = cnn_graph_from(list(model), torch.randn(16, 1, 10, 10))
    assert graph.native_program is None
    codes = graph_input(graph, torch.randn(4, 1, 10, 10))
    assert np.array_equal(graph(codes), graph.run_each(codes))


def _run(x: torch.Tensor, ops: list[str], steps: list[int]) -> torch.Tensor:
    return native.tflite_run_program([x], [], ops, torch.tensor(steps, dtype=torch.int64))


def test_malformed_programs_are_refused() -> None:
    x = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="unknown step kind 5"):
        _run(x, [], [5, 0])
    with pytest.raises(RuntimeError, match="reads value 3, which does not exist yet"):
        _run(x, [], [-1, 2, 0, 3, 2, 6])
    with pytest.raises(RuntimeError, match="the program ends inside a step"):
        _run(x, [], [-1, 2, 0, 0])
    with pytest.raises(RuntimeError, match="unknown argument tag 9"):
        _run(x, ["mixprec::tflite_requantize"], [0, 1, 9, 0])
    with pytest.raises(RuntimeError, match="the program has no steps"):
        _run(x, [], [])
    with pytest.raises(RuntimeError, match="leaves out mixprec::tflite_requantize's argument multiplier"):
        _run(x, ["mixprec::tflite_requantize"], [0, 2, 0, 0, 2, 0])
    with pytest.raises(RuntimeError, match="passes 8 arguments to mixprec::tflite_requantize, which takes 6"):
        _run(x, ["mixprec::tflite_requantize"], [0, 8, *[0, 0] * 8])
    with pytest.raises(RuntimeError, match="contiguous 1-D int64 tensor"):
        native.tflite_run_program([x], [], [], torch.zeros(2, dtype=torch.int32))
    assert _run(x, [], [-1, 2, 0, 0, 2, 6]).shape == (6,)


def test_a_decoded_program_runs_from_python_as_the_operator_does() -> None:
    """``native.tflite_program`` (decoded once, called without the dispatcher): the operator's result, its checks
    made once when decoding, and a wrong number of inputs refused on every call."""
    x = torch.arange(6, dtype=torch.int8).reshape(2, 3)
    steps = torch.tensor([-1, 2, 0, 0, 2, 6], dtype=torch.int64)
    program = native.tflite_program(1, [], [], steps)
    assert torch.equal(program.run_one(x), native.tflite_run_program([x], [], [], steps))
    assert torch.equal(program.run([x]), x.reshape(6))
    with pytest.raises(RuntimeError, match="the program takes 1 inputs, got 2"):
        program.run([x, x])
    with pytest.raises(RuntimeError, match="reads value 1, which does not exist yet"):
        native.tflite_program(1, [], [], torch.tensor([-1, 2, 0, 1, 2, 6], dtype=torch.int64))
    with pytest.raises(RuntimeError, match="no constant 0"):
        native.tflite_program(1, [], ["mixprec::tflite_requantize"], torch.tensor([0, 1, 1, 0], dtype=torch.int64))
