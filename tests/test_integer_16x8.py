"""TFLite's 16x8 mode in the integer engine: int16 activations (zero point 0), int8 weights,
int64 biases, mixed with int8 per operator through QUANTIZE; byte-identical to LiteRT's
reference kernels, .tflite round trips, the int64 rescales, and bad input."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from test_integer_fc import litert_outputs

from mixprec import InputError
from mixprec.integer import (
    AddNode,
    Conv2DNode,
    DepthwiseConv2DNode,
    DequantizeNode,
    FullyConnectedNode,
    Graph,
    MaxPool2DNode,
    MulNode,
    Quantization,
    QuantizeNode,
    ReshapeNode,
    TanhNode,
    TensorSpec,
    export_tflite,
    load_tflite,
)
from mixprec.integer.core.fixedpoint import (
    multiply_by_quantized_multiplier_int64,
    multiply_by_quantized_multiplier_single_round_int64,
)


def _scales(rng: np.random.Generator, count: int) -> tuple[float, ...]:
    return tuple(float(np.float32(s)) for s in rng.uniform(0.002, 0.03, count))


def _calibrated(inputs: tuple[TensorSpec, ...], nodes: list, make, dtype: str, sample: np.ndarray) -> object:
    """The node ``make(grid)`` builds, its output grid fitted to what it gives on ``sample`` (the
    largest magnitude onto 90% of the type's range; int8 grids centred by a zero point), so no
    layer saturates wholesale and the comparison sees real arithmetic."""
    codes = 32767 if dtype == "int16" else 127

    def measure(biggest: float) -> tuple[float, float]:
        graph = Graph(inputs, (*nodes, make(Quantization.per_tensor(biggest / codes))))
        values = graph.output_quant.values_of(graph(sample))
        return float(values.min()), float(values.max())

    biggest = 1e9  # probes from wide to narrow until one sees the values, then one that fits them
    for _ in range(20):
        low, high = measure(biggest)
        peak = max(abs(low), abs(high))
        if peak > 0.05 * biggest:
            break
        biggest = max(4 * peak, biggest / 100)
    low, high = measure(max(2 * peak, biggest / 100))
    if dtype == "int16":
        return make(Quantization.per_tensor(max(abs(low), abs(high), 1e-3) / (0.9 * 32767)))
    scale = max(high - low, 1e-3) / (0.9 * 255)
    return make(Quantization.per_tensor(scale, int(np.clip(round(-128 - low / scale + 12), -128, 127))))


def mixed_graph(rng: np.random.Generator, per_channel: bool, activation: str) -> Graph:
    """int8 in -> QUANTIZE int16 -> CONV_2D (stride 2) -> DEPTHWISE (multiplier 2, dilation 2) ->
    MAX_POOL -> QUANTIZE int8 -> CONV_2D 1x1 (int8) -> QUANTIZE int16 -> RESHAPE ->
    FULLY_CONNECTED (``activation``) -> DEQUANTIZE: int8 and 16x8 operators in one graph, each
    output grid calibrated on random inputs."""
    def weights_quant(count: int, axis: int) -> Quantization:
        scales = _scales(rng, count if per_channel else 1)
        return Quantization(scales, (0,) * len(scales), axis if per_channel else 0)

    def wide_bias(count: int) -> np.ndarray:  # int64, some beyond int32 for the larger accumulators
        return rng.integers(-(2**24), 2**24, count).astype(np.int64)

    inputs = (TensorSpec("input", (1, 11, 9, 3),
                         Quantization.per_tensor(float(rng.uniform(0.02, 0.1)), int(rng.integers(-10, 10)))),)
    sample = rng.integers(-128, 128, (32, 11, 9, 3)).astype(np.int8)
    conv_w = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    dw_w = rng.integers(-127, 128, (1, 3, 2, 12)).astype(np.int8)
    pw_w = rng.integers(-127, 128, (5, 1, 1, 12)).astype(np.int8)
    fc_w = rng.integers(-127, 128, (4, 5 * 3 * 2)).astype(np.int8)
    for w in (conv_w, dw_w, pw_w, fc_w):
        w.reshape(-1)[0] = 127
    conv_q, dw_q, pw_q = weights_quant(6, 0), weights_quant(12, 3), weights_quant(5, 0)
    conv_b, dw_b, pw_b = wide_bias(6), wide_bias(12), rng.integers(-20000, 20000, 5).astype(np.int32)
    fc_b, fc_spread = wide_bias(4), _scales(rng, 4)
    makers = [
        ("int16", lambda q: QuantizeNode((0,), q, "int16")),
        ("int16", lambda q: Conv2DNode((1,), conv_w, conv_q, conv_b, q, "SAME", (2, 2), (1, 1), "relu")),
        ("int16", lambda q: DepthwiseConv2DNode((2,), dw_w, dw_q, dw_b, q, "VALID", (1, 1), (2, 2), "none")),
        (None, MaxPool2DNode((3,), (2, 2), (1, 1), "SAME")),
        ("int8", lambda q: QuantizeNode((4,), q)),
        ("int8", lambda q: Conv2DNode((5,), pw_w, pw_q, pw_b, q, "SAME")),
        ("int16", lambda q: QuantizeNode((6,), q, "int16")),
        (None, ReshapeNode((7,), (30,))),
        ("int16", None),  # the fully connected layer, built below once its input is known
        (None, DequantizeNode((9,))),
    ]
    nodes: list = []
    for dtype, make in makers:
        if dtype is not None and make is None:
            # weight scales that put the pre-activations near +-3, so ReLU / ReLU6 cut inside the range
            prefix = Graph(inputs, tuple(nodes))
            reach = float(np.abs(prefix.output_quant.values_of(prefix(sample))).max())
            scales = tuple(float(np.float32(3 * s / 0.016 / (reach * 30 * 64))) for s in fc_spread)
            fc_q = Quantization(scales if per_channel else scales[:1], (0,) * (4 if per_channel else 1))
            make = lambda q, w=fc_q: FullyConnectedNode((8,), fc_w, w, fc_b, q, activation)  # noqa: E731
        nodes.append(make if dtype is None else _calibrated(inputs, nodes, make, dtype, sample))
    return Graph(inputs, tuple(nodes))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_mixed_int8_and_16x8_graphs_are_byte_identical_to_litert(per_channel: bool, activation: str,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    rng = np.random.default_rng(zlib.crc32(f"16x8-{per_channel}-{activation}".encode()))
    for _ in range(3):
        graph = mixed_graph(rng, per_channel, activation)
        assert graph.tensor_dtypes.count("int16") == 7 and graph.tensor_dtypes.count("int8") == 3
        path = tmp_path / "mixed.tflite"
        export_tflite(graph, path)
        inputs = rng.integers(-128, 128, (64, 11, 9, 3)).astype(np.int8)
        inputs[0], inputs[1] = -128, 127
        expected = litert_outputs(path, inputs)
        assert np.array_equal(graph(inputs), expected)
        reloaded = load_tflite(path)
        assert reloaded.tensor_dtypes == graph.tensor_dtypes
        assert np.array_equal(reloaded(inputs), expected)


def test_int64_rescales_match_their_definitions_in_exact_integers() -> None:
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.integers(-(2**47), 2**47, 4000), [-(2**47), 2**47 - 1, 0, 1, -1]])
    multiplier = rng.integers(2**30, 2**31, x.size)
    multiplier[:50] = 0x7FFF0000 + rng.integers(0, 0xFFFF, 50)  # the reduced form's saturating branch
    shift = rng.integers(-31, 8, x.size)
    reduced = multiply_by_quantized_multiplier_int64(x, multiplier, shift)
    single = multiply_by_quantized_multiplier_single_round_int64(x, multiplier, shift)
    for i in range(x.size):
        xi, m, s = int(x[i]), int(multiplier[i]), int(shift[i])
        r = 0x7FFF if m >= 0x7FFF0000 else (m + (1 << 15)) >> 16
        expect_reduced = (xi * r + (1 << (14 - s))) >> (15 - s)
        expect_single = (xi * m + (1 << (30 - s))) >> (31 - s)
        assert reduced[i] == max(-(2**31), min(2**31 - 1, expect_reduced))
        assert single[i] == max(-(2**31), min(2**31 - 1, expect_single))


def test_bad_16x8_input_is_refused() -> None:
    grid = Quantization.per_tensor(0.001)
    with pytest.raises(InputError, match="zero point must be 0"):
        TensorSpec("x", (1, 4), Quantization.per_tensor(0.001, 3), "int16")
    with pytest.raises(InputError, match="zero point must be 0"):
        QuantizeNode((0,), Quantization.per_tensor(0.001, 5), "int16")
    with pytest.raises(InputError, match="int8 or int16"):
        QuantizeNode((0,), grid, "int32")
    weights = np.ones((3, 4), np.int8)
    spec = TensorSpec("x", (1, 4), grid, "int16")
    fc = FullyConnectedNode((0,), weights, Quantization.per_tensor(0.01), None, Quantization.per_tensor(0.01, 2))
    with pytest.raises(InputError, match="FULLY_CONNECTED output: an int16 zero point must be 0"):
        Graph((spec,), (fc,))
    # int16 reaches an operator that does not take it (EMBEDDING reads int32 ids): refused by name
    from mixprec.integer import EmbeddingNode
    with pytest.raises(InputError, match=r"operator 0 \(EMBEDDING\) takes int32 inputs, but tensor 0 is int16"):
        Graph((spec,), (EmbeddingNode((0,), np.zeros((4, 2), np.int8), grid),))
    # an int64 bias on int8 activations
    wide = FullyConnectedNode((0,), weights, Quantization.per_tensor(0.01), np.zeros(3, np.int64), grid)
    with pytest.raises(InputError, match="bias must be int32"):
        Graph((TensorSpec("x", (1, 4), Quantization.per_tensor(0.01)),), (wide,))
    with pytest.raises(InputError, match="shift must lie in"):
        multiply_by_quantized_multiplier_int64(1, 2**30, 8)
    with pytest.raises(InputError, match="2\\^47"):
        multiply_by_quantized_multiplier_single_round_int64(2**47, 2**30, 0)
    fine = Quantization.per_tensor(1e-9)  # s_in * s_w / s_out = 10^4: beyond the 16x8 rescale's 2^7
    with pytest.raises(InputError, match="shifts up to 7"):
        Graph((spec,), (FullyConnectedNode((0,), weights, Quantization.per_tensor(0.01), None, fine),))
    graph = Graph((spec,), (FullyConnectedNode((0,), weights, Quantization.per_tensor(0.01), None, grid),))
    with pytest.raises(InputError, match="int16"):
        graph(np.zeros((2, 4), np.int8))


def test_a_pytorch_ds_cnn_converts_to_16x8_and_mixed_graphs_identical_to_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    import torch
    from torch import nn

    import mixprec
    from mixprec.integer.build.cnn import cnn_graph_from
    from mixprec.studies.cnn_models import DSCNN

    torch.manual_seed(0)
    model = DSCNN(width=16, blocks=2).eval()
    mixprec.fold_batchnorm(model)
    layers = [*model.features, nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head]
    calibration = torch.randn(64, 1, 49, 10)
    wide = cnn_graph_from(layers, calibration, activations="int16")
    assert set(wide.tensor_dtypes) == {"int16"}
    assert [node.opcode for node in wide.nodes][-4:] == ["MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE",
                                                          "FULLY_CONNECTED"]
    assert all(node.bias.dtype == np.int64 for node in wide.nodes if getattr(node, "bias", None) is not None)
    # int16 for the first convolution and the head, int8 between
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
    mixed_types = ["int16" if i in (convs[0], len(layers) - 1) else "int8" for i in range(len(layers))]
    mixed = cnn_graph_from(layers, calibration, activations=mixed_types)
    assert [node.opcode for node in mixed.nodes].count("QUANTIZE") == 2
    rng = np.random.default_rng(2)
    for graph, name in ((wide, "wide"), (mixed, "mixed")):
        path = tmp_path / f"{name}.tflite"
        export_tflite(graph, path)
        spec = graph.inputs[0]
        info = np.iinfo(spec.dtype)
        inputs = np.clip(np.round(rng.normal(0, 1, (300, 49, 10, 1)) / spec.quant.scale[0]), info.min,
                         info.max).astype(spec.dtype)
        assert np.array_equal(graph(inputs), litert_outputs(path, inputs))
    # 16x8 keeps more of the float model than int8 on the same calibration (measured 5.4x closer here: the
    # int8 weights, shared by both, bound what int16 activations can win)
    x = torch.randn(200, 1, 49, 10)
    with torch.no_grad():
        reference = nn.Sequential(*layers)(x).numpy()
    errors = {}
    for kind in ("int8", "int16"):
        graph = cnn_graph_from(layers, calibration, activations=kind)
        spec = graph.inputs[0]
        info = np.iinfo(spec.dtype)
        codes = np.clip(np.round(x.permute(0, 2, 3, 1).numpy() / spec.quant.scale[0]) + spec.quant.zero_point[0],
                        info.min, info.max).astype(spec.dtype)
        errors[kind] = float(np.abs(graph.output_quant.values_of(graph(codes)) - reference).max())
    assert errors["int16"] < errors["int8"] / 4
    with pytest.raises(InputError, match="one of them per layer"):
        cnn_graph_from(layers, calibration, activations=["int16"])
    with pytest.raises(InputError, match="one of them per layer"):
        cnn_graph_from(layers, calibration, activations="int4")


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_concatenation_is_byte_identical_to_litert_and_refuses_mixed_grids(dtype: str, tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from mixprec.integer import ConcatenationNode

    rng = np.random.default_rng(zlib.crc32(f"concat-{dtype}".encode()))
    grid = Quantization.per_tensor(0.05, 3 if dtype == "int8" else 0)
    spec = TensorSpec("x", (1, 5, 4, 3), grid, dtype)
    pool = MaxPool2DNode((0,), (2, 2), (1, 1), "SAME")
    graph = Graph((spec,), (pool, ConcatenationNode((0, 1, 0), axis=-1), ReshapeNode((2,), (5, 36)),
                            ConcatenationNode((3, 3), axis=1)))
    assert graph.tensor_shapes[-1] == (1, 10, 36)
    info = np.iinfo(dtype)
    inputs = rng.integers(info.min, info.max + 1, (50, 5, 4, 3)).astype(dtype)
    path = tmp_path / "concat.tflite"
    export_tflite(graph, path)
    expected = litert_outputs(path, inputs)
    assert np.array_equal(graph(inputs), expected)
    assert np.array_equal(load_tflite(path)(inputs), expected)
    requantized = QuantizeNode((0,), Quantization.per_tensor(0.07, 0), dtype)
    with pytest.raises(InputError, match="share one type and one grid"):
        Graph((spec,), (requantized, ConcatenationNode((0, 1))))
    with pytest.raises(InputError, match="non-batch axis"):
        Graph((spec,), (ConcatenationNode((0, 0), axis=0),))
    with pytest.raises(InputError, match="equal in every other dimension"):
        Graph((spec,), (pool, ReshapeNode((1,), (4, 5, 3)), ConcatenationNode((0, 2), axis=-1)))


def test_16x8_add_and_mul_are_byte_identical_to_litert_and_the_power_of_two_add_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    tflite = pytest.importorskip("tflite")
    rng = np.random.default_rng(11)
    spec = TensorSpec("x", (1, 6, 5, 3), Quantization.per_tensor(0.004), "int16")
    pool = MaxPool2DNode((0,), (2, 2), (1, 1), "SAME")
    requantized = QuantizeNode((0,), Quantization.per_tensor(0.0023), "int16")
    for activation in ("none", "relu", "relu6"):
        add = AddNode((1, 2), Quantization.per_tensor(0.0061), activation)
        mul = MulNode((1, 3), Quantization.per_tensor(0.21), activation)
        graph = Graph((spec,), (pool, requantized, add, mul, AddNode((3, 4), Quantization.per_tensor(0.2))))
        inputs = rng.integers(-32768, 32768, (200, 6, 5, 3)).astype(np.int16)
        path = tmp_path / f"add-{activation}.tflite"
        export_tflite(graph, path)
        expected = litert_outputs(path, inputs)
        assert np.array_equal(graph(inputs), expected)
        if activation == "none":  # real arithmetic, not a saturated corner (ReLU6 leaves 61 codes here)
            assert len(np.unique(expected)) > 1000
    # the same file flagged as the power-of-two-scale int16 ADD (another kernel) is refused
    data = bytearray(path.read_bytes())
    model = tflite.Model.GetRootAs(bytes(data), 0)
    operator = model.Subgraphs(0).Operators(2)  # the first ADD
    table = operator.BuiltinOptions()
    options = tflite.AddOptions()
    options.Init(table.Bytes, table.Pos)
    offset = options._tab.Offset(6)  # pot_scale_int16
    assert offset and data[options._tab.Pos + offset] == 0
    data[options._tab.Pos + offset] = 1
    (tmp_path / "pot.tflite").write_bytes(bytes(data))
    with pytest.raises(InputError, match="power-of-two-scale int16 ADD"):
        load_tflite(tmp_path / "pot.tflite")


def test_16x8_softmax_is_byte_identical_to_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from mixprec.integer import SoftmaxNode
    from mixprec.integer.ops.softmax16 import int16_table, softmax16_params

    rng = np.random.default_rng(5)
    for index, (scale, beta) in enumerate([(0.0002, 1.0), (0.0007, 0.5), (0.003, 1.0), (0.01, 2.0), (1e-5, 1.0)]):
        graph = Graph((TensorSpec("x", (1, 3, 12), Quantization.per_tensor(scale), "int16"),),
                      (SoftmaxNode((0,), beta),))
        assert graph.tensor_dtypes[-1] == "int16" and graph.output_quant == Quantization.per_tensor(1 / 32768)
        path = tmp_path / f"softmax{index}.tflite"
        export_tflite(graph, path)
        inputs = rng.integers(-32768, 32768, (300, 3, 12)).astype(np.int16)
        inputs[0] = 0  # a flat row
        inputs[1, :, 0], inputs[1, :, 1:] = 32767, -32768  # one winner
        expected = litert_outputs(path, inputs)
        assert np.array_equal(graph(inputs), expected)
        assert np.array_equal(load_tflite(path)(inputs), expected)
    # the tables interpolate exp and 1 / (1 + x) to within 2 LSB of Q0.15 at every point of their grids
    exp_table = softmax16_params(0.001, 1.0).exp_table
    assert exp_table.shape == (513,) and exp_table[-1] == 32767
    assert np.abs(exp_table[:-1] - np.exp(np.linspace(-10, 0, 513)[:-1]) * 32768).max() <= 2
    with pytest.raises(InputError, match="beta must be a positive"):
        softmax16_params(0.001, 0.0)
    assert int16_table(lambda v: 0.5, 0.0, 1.0).tolist() == [16384] * 513


def test_the_activation_mix_search_keeps_its_budget_and_lowers_the_error() -> None:
    import torch
    from torch import nn

    import mixprec
    from mixprec.integer.build.mix import arena_bytes, choose_activation_types, output_error
    from mixprec.studies.cnn_models import DSCNN

    torch.manual_seed(0)
    model = DSCNN(width=16, blocks=2).eval()
    mixprec.fold_batchnorm(model)
    layers = [*model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head]
    calibration, validation = torch.randn(64, 1, 49, 10), torch.randn(48, 1, 49, 10)
    with torch.no_grad():
        reference = nn.Sequential(*layers)(validation).numpy()
    from mixprec.integer.build.cnn import cnn_graph_from

    int8_error = output_error(cnn_graph_from(layers, calibration), validation, reference)
    # the arena is the largest operator's: int16 where it does not raise that maximum costs nothing
    free = choose_activation_types(layers, calibration, validation, budget=1.0)
    assert free.arena == free.int8_arena and free.error <= int8_error
    mix = choose_activation_types(layers, calibration, validation, budget=1.5)
    assert free.arena < mix.arena <= 1.5 * mix.int8_arena
    assert mix.types.count("int16") > free.types.count("int16") and mix.error < free.error
    assert mix.error == output_error(mix.graph, validation, reference)
    # the arena of a chain: the largest input + output of one operator (bytes per sample)
    first = mix.graph
    sizes = [int(np.prod(s[1:])) * np.dtype(d).itemsize for s, d in zip(first.tensor_shapes, first.tensor_dtypes)]
    assert arena_bytes(first) == max(sizes[k] + sizes[k + 1] for k in range(len(sizes) - 1))
    with pytest.raises(InputError, match="at least 1.0"):
        choose_activation_types(layers, calibration, validation, budget=0.5)
    # a latency budget: the mix's time as the search measured it when it compared it with the budget
    # (the comparison itself, not a timing claim: no speed is asserted here)
    timed = choose_activation_types(layers, calibration, validation, budget=1.5, latency_inputs=validation[:8])
    assert 0 < timed.seconds <= 1.5 * timed.int8_seconds and timed.error <= int8_error
    assert timed.arena == arena_bytes(timed.graph) and timed.int8_arena == free.int8_arena
    with pytest.raises(InputError, match="latency_inputs must be a float NCHW"):
        choose_activation_types(layers, calibration, validation, latency_inputs=validation[0])
    from mixprec.integer.build.mix import graph_seconds

    with pytest.raises(InputError, match="repeats must be at least 1"):
        graph_seconds(validation, repeats=0)


def test_activation_types_by_rules_over_layer_names() -> None:
    import torch
    from torch import nn

    from mixprec.integer.build.cnn import cnn_graph_from
    from mixprec.integer.build.mix import types_from_rules

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    names = [name for name, _ in model.named_children()]
    types = types_from_rules(names, [("0", "int16"), (r"[46]", "int16")])
    assert types == ["int16", "int8", "int8", "int8", "int16", "int8", "int16"]
    graph = cnn_graph_from(list(model), torch.randn(16, 1, 8, 8), activations=types)
    # int16 first convolution, QUANTIZE to int8, int8 convolution, QUANTIZE to int16, the int16 global mean
    # (AVERAGE_POOL_2D + RESHAPE) and the int16 classifier
    assert [node.opcode for node in graph.nodes] == ["CONV_2D", "QUANTIZE", "CONV_2D", "QUANTIZE", "AVERAGE_POOL_2D",
                                                     "RESHAPE", "FULLY_CONNECTED"]
    assert graph.tensor_dtypes == ("int16", "int16", "int8", "int8", "int16", "int16", "int16", "int16")
    with pytest.raises(InputError, match="match none of the layer names"):
        types_from_rules(names, [("head", "int16")])
    with pytest.raises(InputError, match="activation types are"):
        types_from_rules(names, [("0", "int4")])
    with pytest.raises(InputError, match="not a regular expression"):
        types_from_rules(names, [("(", "int16")])


def test_int16_calibration_is_symmetric_and_refuses_bad_samples() -> None:
    from mixprec.integer.build.layers import calibrate_int16

    grid = calibrate_int16(np.array([-3.0, 1.5, 2.0]))
    assert grid.zero_point == (0,) and grid.scale32[0] == np.float32(3.0 / 32767)
    assert calibrate_int16(np.array([-3.0, 2.0]), margin=0.5).scale32[0] == np.float32(6.0 / 32767)
    with pytest.raises(InputError, match="finite samples"):
        calibrate_int16(np.array([1.0, np.nan]))
    with pytest.raises(InputError, match="range margin"):
        calibrate_int16(np.array([1.0]), margin=2.0)


@pytest.mark.parametrize("kind", ["LOGISTIC", "TANH"])
def test_16x8_logistic_and_tanh_are_byte_identical_to_litert_on_every_input(kind: str, tmp_path: Path) -> None:
    """All 65,536 int16 inputs at power-of-two scales (LiteRT's multiplier-free path, and for
    TANH its doubled one), a scale within CheckedLog2's 1e-3 of a power of two, general scales
    and one where the input saturates the table."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from mixprec.integer import LogisticNode
    from mixprec.integer.ops.sigmoid16 import sigmoid16_params

    node_class = LogisticNode if kind == "LOGISTIC" else TanhNode
    x = np.arange(-32768, 32768, dtype=np.int16).reshape(-1, 1, 1)
    scales = (2.0**-12, 2.0**-11, 2.0**-12 * 1.0004, 1 / 6144, 2.0**-14, 0.00037, 0.001, 0.01, 1.5)
    for index, scale in enumerate(scales):
        graph = Graph((TensorSpec("x", (1, 1, 1), Quantization.per_tensor(scale), "int16"),), (node_class((0,)),))
        assert graph.tensor_dtypes[-1] == "int16" and graph.output_quant == Quantization.per_tensor(1 / 32768)
        path = tmp_path / f"{kind}{index}.tflite"
        export_tflite(graph, path)
        expected = litert_outputs(path, x)
        assert np.array_equal(graph(x), expected), f"{kind} at scale {scale}"
        assert np.array_equal(load_tflite(path)(x), expected)
    # the multiplier-free paths are taken where LiteRT takes them, and only there
    assert sigmoid16_params(kind, 2.0**-12).shift == 0 and sigmoid16_params(kind, 2.0**-12 * 1.0004).shift == 0
    assert (sigmoid16_params(kind, 2.0**-11).shift == 0) == (kind == "TANH")
    # the function itself: within 2 steps of 1/32768 of the true curve over the input range
    values = x.reshape(-1) * (2.0**-12)
    exact = np.tanh(values) if kind == "TANH" else 1 / (1 + np.exp(-values))
    graph = Graph((TensorSpec("x", (1, 1, 1), Quantization.per_tensor(2.0**-12), "int16"),), (node_class((0,)),))
    assert np.abs(graph(x).reshape(-1) / 32768 - exact).max() * 32768 <= 2.0


def test_the_sigmoid_table_and_bad_16x8_logistic_input() -> None:
    from mixprec.integer import LogisticNode
    from mixprec.integer.ops.sigmoid16 import sigmoid16, sigmoid16_params, sigmoid_table

    table = sigmoid_table()
    samples = 65536 / (1 + np.exp(-np.arange(256) / 24))
    assert table.shape == (256,) and np.all(np.diff(table) >= 0) and table[0] == 32768 and table[-1] == 65535
    assert 0.5 < np.abs(table[:-1] - samples[:-1]).max() < 1.2  # not a plain rounding, never far from one
    with pytest.raises(InputError, match="too large"):
        sigmoid16_params("TANH", 3.0)
    with pytest.raises(InputError, match="positive finite"):
        sigmoid16_params("LOGISTIC", 0.0)
    with pytest.raises(InputError, match="LOGISTIC and TANH, not 'SOFTMAX'"):
        sigmoid16_params("SOFTMAX", 0.001)
    with pytest.raises(InputError, match="int16"):
        sigmoid16(np.zeros(4, np.int8), sigmoid16_params("TANH", 0.001))
    with pytest.raises(InputError, match="zero point"):
        Graph((TensorSpec("x", (1, 4), Quantization.per_tensor(0.001, 3), "int16"),), (LogisticNode((0,)),))


def test_the_arena_counts_what_a_skip_connection_keeps_alive_and_choose_wide_refuses_bad_input() -> None:
    """input (8 B) -> FC 32 -> FC 4 -> FC 8 -> ADD(input, .): while FC 4 runs the input waits for
    the ADD, so 8 + 32 + 4 = 44 bytes are alive (the largest input-plus-output pair is 40)."""
    from mixprec.integer.build.mix import arena_bytes, choose_wide

    grid = Quantization.per_tensor(0.05)

    def fc(source: int, width: int, inputs: int) -> FullyConnectedNode:
        return FullyConnectedNode((source,), np.ones((width, inputs), np.int8), Quantization.per_tensor(0.01), None,
                                  grid)

    graph = Graph((TensorSpec("x", (1, 8), grid),), (fc(0, 32, 8), fc(1, 4, 32), fc(2, 8, 4), AddNode((0, 3), grid)))
    assert arena_bytes(graph) == 44
    chain = Graph((TensorSpec("x", (1, 8), grid),), (fc(0, 32, 8), fc(1, 4, 32)))
    assert arena_bytes(chain) == 40
    with pytest.raises(InputError, match="at least 1.0"):
        choose_wide(["a"], lambda wide: graph, lambda g: 0.0, budget=0.9)
    with pytest.raises(InputError, match="distinct and at least one"):
        choose_wide(["a", "a"], lambda wide: graph, lambda g: 0.0)
