"""Integer fully connected layers: byte-identical to LiteRT's reference kernels, and bad input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mixprec import InputError
from mixprec.integer.graph import FullyConnectedNode, Graph, Quantization
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
        nodes.append(FullyConnectedNode(weights, Quantization(scales, (0,) * count),
                                        rng.integers(-20000, 20000, width_out).astype(np.int32) if bias else None,
                                        output, activation if index == len(widths) - 2 else "relu"))
    return Graph((1, widths[0]), Quantization.per_tensor(float(rng.uniform(0.02, 0.1)), int(rng.integers(-10, 10))),
                 tuple(nodes))


def litert_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], list(inputs.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], inputs)
    interpreter.invoke()
    return interpreter.get_tensor(sink["index"])


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
    with pytest.raises(InputError, match="takes an int8 numpy array, got float32"):
        graph(np.zeros((1, 24), np.float32))
    with pytest.raises(InputError, match=r"input shape \(1, 23\) does not match the model's \(1, 24\)"):
        graph(np.zeros((1, 23), np.int8))
    weights = np.zeros((4, 8), np.int8)
    output = Quantization.per_tensor(0.1)
    with pytest.raises(InputError, match="one scale or 4 \\(per output channel\\)"):
        FullyConnectedNode(weights, Quantization((0.5, 0.25), (0, 0)), None, output)
    with pytest.raises(InputError, match="positive finite float32"):
        Quantization((0.1,), (0,))  # 0.1 is not a float32 value
    with pytest.raises(InputError, match="positive finite float32"):
        Quantization.per_tensor(float("nan"))
    with pytest.raises(InputError, match="unknown activation 'gelu'"):
        FullyConnectedNode(weights, Quantization.per_tensor(0.1), None, output, "gelu")
    with pytest.raises(InputError, match="operator 0 takes 8 features but receives 9"):
        Graph((1, 9), Quantization.per_tensor(0.1), (FullyConnectedNode(weights, Quantization.per_tensor(0.1),
                                                                         None, output),))
    with pytest.raises(InputError, match="takes a mixprec.integer.Graph"):
        export_tflite("model", "x.tflite")  # type: ignore[arg-type]
