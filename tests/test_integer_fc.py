"""Integer operators: byte-identical to LiteRT's reference kernels, and bad input refused."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest

from mixprec import InputError
from mixprec.integer import (
    AddNode,
    FullyConnectedNode,
    Graph,
    LogisticNode,
    MulNode,
    Quantization,
    SoftmaxNode,
    TanhNode,
    TensorSpec,
)
from mixprec.integer.tflite.export import export_tflite


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
    seed = zlib.crc32(f"{per_channel}-{activation}".encode())
    _check_random_graphs_against_litert(np.random.default_rng(seed), per_channel, activation, tmp_path)


def test_per_tensor_multiplier_takes_the_product_of_scales_in_double(tmp_path: Path) -> None:
    """Seed 21 drew a graph whose per-tensor multiplier, from a float32 product of the scales, put
    one of 8000 outputs 1 LSB away from LiteRT."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    _check_random_graphs_against_litert(np.random.default_rng(21), False, "relu", tmp_path)


def _check_random_graphs_against_litert(rng: np.random.Generator, per_channel: bool, activation: str,
                                        tmp_path: Path) -> None:
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
    with pytest.raises(InputError, match="'input' must be a numpy array of int8, got float32"):
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


@pytest.mark.parametrize("node_class", [LogisticNode, TanhNode], ids=["logistic", "tanh"])
def test_logistic_and_tanh_tables_are_byte_identical_to_litert(node_class: type, tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    rng = np.random.default_rng(11)
    for trial in range(6):  # input scales from coarse to fine, zero points anywhere
        scale, zero_point = float(10 ** rng.uniform(-3, -0.5)), int(rng.integers(-128, 128))
        graph = Graph((TensorSpec("x", (1, 64), Quantization.per_tensor(scale, zero_point)),), (node_class((0,)),))
        path = tmp_path / f"t{trial}.tflite"
        export_tflite(graph, path)
        x = np.tile(np.arange(-128, 128, dtype=np.int8), 4).reshape(16, 64)  # every code
        x = np.concatenate([x, rng.integers(-128, 128, (1000, 64)).astype(np.int8)])
        assert np.array_equal(graph(x), litert_outputs(path, x)), (scale, zero_point)


def test_softmax_at_several_input_scales_is_byte_identical_to_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    rng = np.random.default_rng(12)
    for trial, (scale, beta, depth) in enumerate([(0.01, 1.0, 8), (0.05, 1.0, 16), (0.125, 1.0, 10),
                                                  (0.4, 1.0, 32), (0.1, 0.5, 5), (1.5, 1.0, 64)]):
        zero_point = int(rng.integers(-128, 128))
        graph = Graph((TensorSpec("x", (1, depth), Quantization.per_tensor(scale, zero_point)),),
                      (SoftmaxNode((0,), beta),))
        path = tmp_path / f"s{trial}.tflite"
        export_tflite(graph, path)
        x = rng.integers(-128, 128, (1000, depth)).astype(np.int8)
        x[0], x[1] = -128, 127  # uniform rows
        assert np.array_equal(graph(x), litert_outputs(path, x)), (scale, beta, depth)


def mixed_graph(rng: np.random.Generator) -> Graph:
    """FC -> (ADD with a second input) -> MUL with itself -> TANH, and a softmax-free tail."""
    fc = random_graph(rng, True, "relu", True, (12, 8)).nodes[0]
    second = TensorSpec("y", (1, 8), Quantization.per_tensor(0.07, 3))
    return Graph((TensorSpec("x", (1, 12), Quantization.per_tensor(0.05, -2)), second),
                 (fc, AddNode((2, 1), Quantization.per_tensor(0.11, -7)),
                  MulNode((3, 3), Quantization.per_tensor(0.2, 1), "relu6"), TanhNode((4,))))


def test_load_tflite_reads_back_what_export_writes(tmp_path: Path) -> None:
    pytest.importorskip("tflite")
    from mixprec.integer import load_tflite

    rng = np.random.default_rng(13)
    graph = mixed_graph(rng)
    path = tmp_path / "mixed.tflite"
    export_tflite(graph, path)
    loaded = load_tflite(path)
    x = rng.integers(-128, 128, (500, 12)).astype(np.int8)
    y = rng.integers(-128, 128, (500, 8)).astype(np.int8)
    assert np.array_equal(loaded(x, y), graph(x, y))
    assert [node.opcode for node in loaded.nodes] == ["FULLY_CONNECTED", "ADD", "MUL", "TANH"]
    if importlib.util.find_spec("ai_edge_litert"):
        assert np.array_equal(graph(x, y), litert_outputs(path, x, y))


def test_load_tflite_refuses_truncated_files_and_unknown_ops(tmp_path: Path) -> None:
    pytest.importorskip("tflite")
    from mixprec.integer import load_tflite

    path = tmp_path / "mixed.tflite"
    export_tflite(mixed_graph(np.random.default_rng(14)), path)
    data = path.read_bytes()
    (tmp_path / "cut.tflite").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_tflite(tmp_path / "cut.tflite")
    (tmp_path / "text.tflite").write_bytes(b"not a model at all")
    with pytest.raises(InputError, match="no TFL3 identifier"):
        load_tflite(tmp_path / "text.tflite")
    with pytest.raises(InputError, match="cannot read"):
        load_tflite(tmp_path / "missing.tflite")
    # Rename the TANH opcode to HARD_SWISH in the file: refused by name.
    import tflite

    model = tflite.Model.GetRootAs(data, 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    tanh = next(c for c in codes if c.BuiltinCode() == tflite.BuiltinOperator.TANH)
    patched = bytearray(data)
    offset = tanh._tab.Offset(10)  # builtin_code (int32 field)
    swish = int(tflite.BuiltinOperator.HARD_SWISH)
    patched[tanh._tab.Pos + offset: tanh._tab.Pos + offset + 4] = swish.to_bytes(4, "little")
    offset = tanh._tab.Offset(4)  # deprecated_builtin_code (int8 field)
    patched[tanh._tab.Pos + offset] = swish
    (tmp_path / "swish.tflite").write_bytes(bytes(patched))
    with pytest.raises(InputError, match="operator 3 is HARD_SWISH, which mixprec's integer engine does not support"):
        load_tflite(tmp_path / "swish.tflite")


def test_operator_records_and_kernels_refuse_bad_input() -> None:
    from mixprec.integer import FullyConnectedParams, add, fully_connected, mul
    from mixprec.integer.ops.activations import softmax_params
    from mixprec.integer.ops.elementwise import AddParams, MulParams

    weights, one = np.zeros((4, 8), np.int8), np.array([2**30], np.int32)
    with pytest.raises(InputError, match="weights must be a 2-D int8 array"):
        FullyConnectedParams(weights.astype(np.int16), None, 0, one, np.zeros(1, np.int32), 0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"bias must be int32 \[4\]"):
        FullyConnectedParams(weights, np.zeros(3, np.int32), 0, one, np.zeros(1, np.int32), 0)
    with pytest.raises(InputError, match="offsets out of range"):
        FullyConnectedParams(weights, None, 300, one, np.zeros(1, np.int32), 0)
    record = FullyConnectedParams(weights, None, 0, one, np.zeros(1, np.int32), 0)
    with pytest.raises(InputError, match="does not end in 8 features"):
        fully_connected(np.zeros((2, 7), np.int8), record)
    with pytest.raises(InputError, match="takes an int8 numpy array"):
        fully_connected(np.zeros((2, 8), np.float32), record)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="do not broadcast"):
        add(np.zeros((2, 3), np.int8), np.zeros((2, 4), np.int8), AddParams(0, 0, 2**30, 0, 2**30, 0, 2**30, 0, 0))
    with pytest.raises(InputError, match="ADD multipliers must be smaller than one"):
        AddParams(0, 0, 2**30, 1, 2**30, 0, 2**30, 0, 0)
    with pytest.raises(InputError, match="takes int8 numpy arrays"):
        mul(np.zeros(3, np.int16), np.zeros(3, np.int8), MulParams(0, 0, 2**30, 0, 0))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="beta must be a positive finite number"):
        softmax_params(0.1, float("nan"))
    with pytest.raises(InputError, match="too small"):
        softmax_params(1e-9, 1.0)


def test_the_native_fully_connected_equals_the_numpy_reference() -> None:
    """FULLY_CONNECTED by the native kernel gives the reference's codes in int8 and 16x8: per-channel and
    per-tensor multipliers with right and left shifts (the single rounding in 128 bits; every exact tie
    of x / 2), input offsets at the ends of the range, biases at the proofs' bounds or none, clamped
    activation ranges, inputs with leading dimensions, reductions long enough to split rows between
    threads."""
    from mixprec.integer.ops.fully_connected import FullyConnectedParams, fully_connected, fully_connected_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(17)
    for trial in range(24):
        dtype = "int8" if trial % 2 == 0 else "int16"
        low, high = (-128, 127) if dtype == "int8" else (-32768, 32767)
        rows, features, outs = [(5, 7, 3), (2000, 64, 10), (3, 300, 33), (1, 1, 1)][trial % 4]
        weights = rng.integers(-127, 128, (outs, features)).astype(np.int8)
        per = outs if trial % 3 else 1
        multiplier = rng.integers(2**30, 2**31, per).astype(np.int32)
        shift = rng.integers(-20, 4 if trial % 5 == 0 else 0, per).astype(np.int32)
        bound = 2**30 - 1 if dtype == "int8" else 2**46 - 1
        bias = None if trial % 4 == 3 else rng.integers(-bound, bound, outs, dtype=np.int64).astype(
            np.int32 if dtype == "int8" else np.int64)
        input_offset = int(rng.choice([-127, 128, 0, 9])) if dtype == "int8" else 0
        output_offset = int(rng.integers(-30, 30)) if dtype == "int8" else 0
        params = FullyConnectedParams(weights=weights, bias=bias, input_offset=input_offset, multiplier=multiplier,
                                      shift=shift, output_offset=output_offset,
                                      activation_min=low if trial % 3 else output_offset, activation_max=high,
                                      dtype=dtype)
        x = rng.integers(low, high + 1, (rows, features)).astype(dtype)
        x[0] = high if trial % 2 else low
        if trial % 6 == 1:
            x = x.reshape(1, rows, features)
        assert np.array_equal(fully_connected(x, params), fully_connected_reference(x, params)), trial
    for dtype in ("int8", "int16"):  # out = x / 2 rounded: every odd x a tie
        halve = FullyConnectedParams(weights=np.ones((1, 1), np.int8), bias=None, input_offset=0,
                                     multiplier=np.array([2**30], np.int32), shift=np.zeros(1, np.int32),
                                     output_offset=0, activation_min=-128 if dtype == "int8" else -32768,
                                     activation_max=127 if dtype == "int8" else 32767, dtype=dtype)
        x = np.arange(-128, 128).astype(dtype)[:, None]
        assert np.array_equal(fully_connected(x, halve), fully_connected_reference(x, halve)), dtype
    import torch

    with pytest.raises(RuntimeError, match="weights must be contiguous int8"):
        native.tflite_fully_connected(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8), None,
                                      torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, 0,
                                      -128, 127)
    with pytest.raises(RuntimeError, match="shifts in"):
        native.tflite_fully_connected(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.int8), None,
                                      torch.ones(1, dtype=torch.int32), torch.full((1,), 31, dtype=torch.int32), 0, 0,
                                      -128, 127)
