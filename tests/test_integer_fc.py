"""Integer operators: byte-identical to LiteRT's reference kernels, and bad input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mixprec import InputError
from mixprec.integer.graph import AddNode, FullyConnectedNode, Graph, MulNode, Quantization, TensorSpec
from mixprec.integer.tflite_export import export_tflite


def random_graph(rng: np.random.Generator, per_channel: bool, activation: str, bias: bool,
                 widths: tuple[int, ...] = (24, 10)) -> Graph:
    nodes = []
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        count = width_out if per_channel else 1
        weights = rng.integers(-127, 128, (width_out, width_in)).astype(np.int8)
        weights[0, :] = 127  # extremes in every layer
        scales = tuple(float(np.float32(s)) for s in rng.uniform(0.001, 0.03, count))
        output = Quantization.per_tensor(float(rng.uniform(0.05, 0.3)), int(rng.integers(-20, 20)))
        nodes.append(FullyConnectedNode((index,), weights, Quantization(scales, (0,) * count),
                                        rng.integers(-20000, 20000, width_out).astype(np.int32) if bias else None,
                                        output, activation if index == len(widths) - 2 else "relu"))
    quant = Quantization.per_tensor(float(rng.uniform(0.02, 0.1)), int(rng.integers(-10, 10)))
    return Graph((TensorSpec("input", (1, widths[0]), quant),), tuple(nodes))


def litert_outputs(path: Path, *inputs: np.ndarray) -> np.ndarray:
    """Run a .tflite file in LiteRT's reference kernels (BUILTIN_REF), inputs resized to the arrays."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    sources = sorted(interpreter.get_input_details(), key=lambda d: d["index"])
    for source, array in zip(sources, inputs):
        interpreter.resize_tensor_input(source["index"], list(array.shape))
    interpreter.allocate_tensors()
    for source, array in zip(sources, inputs):
        interpreter.set_tensor(source["index"], array)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_fully_connected_is_byte_identical_to_litert_reference_kernels(per_channel: bool, activation: str,
                                                                       tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    rng = np.random.default_rng(hash((per_channel, activation)) % 2**32)
    for bias, widths in ((True, (24, 10)), (False, (37, 5)), (True, (16, 33, 8))):
        graph = random_graph(rng, per_channel, activation, bias, widths)
        path = tmp_path / "fc.tflite"
        export_tflite(graph, path)
        inputs = rng.integers(-128, 128, (1000, widths[0])).astype(np.int8)
        inputs[:2] = [[-128], [127]]  # the input extremes
        expected = litert_outputs(path, inputs)
        assert expected.shape == (1000, widths[-1])
        assert np.array_equal(graph(inputs), expected)


def test_graphs_refuse_bad_input() -> None:
    rng = np.random.default_rng(0)
    graph = random_graph(rng, True, "none", True)
    with pytest.raises(InputError, match="'input' must be an int8 numpy array, got float32"):
        graph(np.zeros((1, 24), np.float32))
    with pytest.raises(InputError, match=r"'input' has shape \(1, 23\); the model's is \(1, 24\)"):
        graph(np.zeros((1, 23), np.int8))
    with pytest.raises(InputError, match="takes 1 input arrays, got 2"):
        graph(np.zeros((1, 24), np.int8), np.zeros((1, 24), np.int8))
    weights = np.zeros((4, 8), np.int8)
    output = Quantization.per_tensor(0.1)
    with pytest.raises(InputError, match="one scale or 4 \\(per output channel\\)"):
        FullyConnectedNode((0,), weights, Quantization((0.5, 0.25), (0, 0)), None, output)
    with pytest.raises(InputError, match="positive finite float32"):
        Quantization((0.1,), (0,))  # 0.1 is not a float32 value
    with pytest.raises(InputError, match="positive finite float32"):
        Quantization.per_tensor(float("nan"))
    with pytest.raises(InputError, match="unknown activation 'gelu'"):
        FullyConnectedNode((0,), weights, Quantization.per_tensor(0.1), None, output, "gelu")
    spec = TensorSpec("x", (1, 9), Quantization.per_tensor(0.1))
    with pytest.raises(InputError, match="operator 0: FULLY_CONNECTED takes 8 features but receives 9"):
        Graph((spec,), (FullyConnectedNode((0,), weights, Quantization.per_tensor(0.1), None, output),))
    with pytest.raises(InputError, match=r"operator 0 \(ADD\) reads tensors \(0, 1\), but only tensors 0..0"):
        Graph((spec,), (AddNode((0, 1), output),))
    with pytest.raises(InputError, match="do not broadcast"):
        Graph((spec, TensorSpec("y", (1, 4), Quantization.per_tensor(0.1))), (MulNode((0, 1), output),))
    with pytest.raises(InputError, match="MUL takes two input tensors"):
        MulNode((0,), output)
    with pytest.raises(InputError, match="takes a mixprec.integer.Graph"):
        export_tflite("model", "x.tflite")  # type: ignore[arg-type]


@pytest.mark.parametrize("node_class", [AddNode, MulNode], ids=["add", "mul"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_add_and_mul_with_unequal_scales_are_byte_identical_to_litert(node_class: type, activation: str,
                                                                      tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    rng = np.random.default_rng(7)
    for trial, other_shape in enumerate([(1, 16), (1, 16), (1, 1)]):  # the last one broadcasts
        scales = [float(rng.uniform(0.005, 0.5)) for _ in range(3)]
        zero_points = [int(rng.integers(-128, 128)) for _ in range(3)]
        graph = Graph((TensorSpec("a", (1, 16), Quantization.per_tensor(scales[0], zero_points[0])),
                       TensorSpec("b", other_shape, Quantization.per_tensor(scales[1], zero_points[1]))),
                      (node_class((0, 1), Quantization.per_tensor(scales[2], zero_points[2]), activation),))
        path = tmp_path / f"op{trial}.tflite"
        export_tflite(graph, path)
        a = rng.integers(-128, 128, (1000, 16)).astype(np.int8)
        b = rng.integers(-128, 128, (1000, *other_shape[1:])).astype(np.int8)
        a[0], b[0] = -128, 127
        assert np.array_equal(graph(a, b), litert_outputs(path, a, b)), (trial, scales, zero_points)
