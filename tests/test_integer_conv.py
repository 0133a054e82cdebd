"""CONV_2D and DEPTHWISE_CONV_2D in the integer engine: byte-identical to LiteRT's reference
kernels on random graphs, .tflite round trips, and bad input."""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import numpy as np
import pytest
from cpu_kinds import AVX512_VNNI_BUILD
from test_integer_fc import litert_outputs

from mixprec import InputError
from mixprec.integer import Conv2DNode, DepthwiseConv2DNode, Graph, Quantization, TensorSpec, export_tflite, load_tflite
from mixprec.integer.ops.conv import output_size


def _weight_quant(rng: np.random.Generator, count: int, per_channel: bool, axis: int) -> Quantization:
    scales = tuple(float(np.float32(s)) for s in rng.uniform(0.002, 0.03, count if per_channel else 1))
    return Quantization(scales, (0,) * len(scales), axis if per_channel else 0)


def random_cnn(rng: np.random.Generator, per_channel: bool, padding: str, activation: str) -> Graph:
    """conv (stride 2) -> depthwise (multiplier 2, dilation 2) -> 1x1 conv, on an 11x9x3 input."""
    shape, channels, nodes = (1, 11, 9, 3), 3, []
    layers = [("conv", 8, (3, 3), (2, 2), (1, 1)), ("dw", 2, (3, 2), (1, 1), (2, 2)), ("conv", 5, (1, 1), (1, 1),
                                                                                       (1, 1))]
    for index, (kind, width, kernel, stride, dilation) in enumerate(layers):
        out = channels * width if kind == "dw" else width
        if kind == "dw":
            weights = rng.integers(-127, 128, (1, *kernel, out)).astype(np.int8)
            quant, node_class = _weight_quant(rng, out, per_channel, 3), DepthwiseConv2DNode
        else:
            weights = rng.integers(-127, 128, (out, *kernel, channels)).astype(np.int8)
            quant, node_class = _weight_quant(rng, out, per_channel, 0), Conv2DNode
        weights.reshape(-1)[0] = 127  # an extreme in every layer
        bias = rng.integers(-20000, 20000, out).astype(np.int32)
        output = Quantization.per_tensor(float(rng.uniform(0.05, 0.3)), int(rng.integers(-20, 20)))
        act = activation if index == len(layers) - 1 else "relu"
        nodes.append(node_class((index,), weights, quant, bias, output, padding, stride, dilation, act))
        channels = out
    quant = Quantization.per_tensor(float(rng.uniform(0.02, 0.1)), int(rng.integers(-10, 10)))
    return Graph((TensorSpec("input", shape, quant),), tuple(nodes))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("activation", ["none", "relu6"])
def test_convolutions_are_byte_identical_to_litert_reference_kernels(padding: str, per_channel: bool,
                                                                     activation: str, tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    rng = np.random.default_rng(zlib.crc32(f"{padding}-{per_channel}-{activation}".encode()))
    for _ in range(3):
        graph = random_cnn(rng, per_channel, padding, activation)
        path = tmp_path / "cnn.tflite"
        export_tflite(graph, path)
        inputs = rng.integers(-128, 128, (64, 11, 9, 3)).astype(np.int8)
        inputs[0], inputs[1] = -128, 127  # the input extremes
        expected = litert_outputs(path, inputs)
        assert np.array_equal(graph(inputs), expected)
        assert np.array_equal(load_tflite(path)(inputs), expected)


def test_same_padding_matches_tflite_sizes() -> None:
    assert output_size(11, 3, 2, 1, "SAME") == (6, 1)
    assert output_size(10, 4, 1, 1, "SAME") == (10, 1)  # 3 rows of padding: 1 before, 2 after
    assert output_size(9, 2, 1, 2, "VALID") == (7, 0)


def test_bad_convolutions_are_refused() -> None:
    quant = Quantization.per_tensor(0.125)
    weights = np.ones((4, 3, 3, 2), np.int8)
    with pytest.raises(InputError, match="padding must be one of"):
        Conv2DNode((0,), weights, quant, None, quant, "FULL")
    with pytest.raises(InputError, match=r"per-channel weight scales run along axis 3, got 0"):
        DepthwiseConv2DNode((0,), np.ones((1, 3, 3, 4), np.int8), Quantization((0.125,) * 4, (0,) * 4, 0), None, quant)
    node = Conv2DNode((0,), weights, quant, None, quant, "VALID")
    with pytest.raises(InputError, match="CONV_2D weights take 2 input channels, got 3"):
        node.output_shape([(1, 8, 8, 3)])
    with pytest.raises(InputError, match="does not fit the 2x2 input with VALID padding"):
        node.output_shape([(1, 2, 2, 2)])
    with pytest.raises(InputError, match="depthwise output channels \\(4\\) must be a multiple of the 3"):
        DepthwiseConv2DNode((0,), np.ones((1, 3, 3, 4), np.int8), quant, None, quant).output_shape([(1, 5, 5, 3)])


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pooling_is_byte_identical_to_litert_reference_kernels(padding: str, tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from mixprec.integer import AveragePool2DNode, MaxPool2DNode

    rng = np.random.default_rng(zlib.crc32(padding.encode()))
    conv = random_cnn(rng, True, padding, "none").nodes[0]  # 11x9x3 -> 6x5x8 (SAME) or 5x4x8 (VALID)
    whole_map = (6, 5) if padding == "SAME" else (5, 4)  # one window over the map: the global pooling path
    for pools in [(MaxPool2DNode((1,), (3, 3), (2, 2), padding), AveragePool2DNode((2,), (2, 1), (1, 1), padding)),
                  (AveragePool2DNode((1,), (3, 2), (2, 1), padding, "relu6"), MaxPool2DNode((2,), (2, 2), (1, 1),
                                                                                           padding, "relu")),
                  (AveragePool2DNode((1,), whole_map, (1, 1), "VALID"),),
                  (MaxPool2DNode((1,), whole_map, (1, 1), "VALID", "relu"),)]:
        graph = Graph((TensorSpec("input", (1, 11, 9, 3), Quantization.per_tensor(0.05, -3)),), (conv, *pools))
        path = tmp_path / "pool.tflite"
        export_tflite(graph, path)
        inputs = rng.integers(-128, 128, (200, 11, 9, 3)).astype(np.int8)
        expected = litert_outputs(path, inputs)
        assert np.array_equal(graph(inputs), expected)
        assert np.array_equal(load_tflite(path)(inputs), expected)


def test_average_pooling_rounds_half_away_from_zero_over_in_image_points() -> None:
    from mixprec.integer.ops.conv import PoolParams, pool2d

    same = PoolParams("AVERAGE", (2, 2), (1, 1), "SAME")  # padding after: windows of 4, 2, 2 and 1 points
    positive = np.array([1, 2, 3, 4], np.int8).reshape(1, 2, 2, 1)
    assert pool2d(positive, same)[0, :, :, 0].tolist() == [[3, 3], [4, 4]]  # 2.5 -> 3, 3 -> 3, 3.5 -> 4, 4
    negative = -positive
    assert pool2d(negative, same)[0, :, :, 0].tolist() == [[-3, -3], [-4, -4]]
    assert pool2d(positive, PoolParams("MAX", (2, 2), (1, 1), "SAME"))[0, :, :, 0].tolist() == [[4, 4], [4, 4]]


def test_pad_then_valid_convolution_is_byte_identical_to_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from mixprec.integer import PadNode

    rng = np.random.default_rng(7)
    conv = random_cnn(rng, True, "VALID", "none").nodes[0]
    graph = Graph((TensorSpec("input", (1, 11, 9, 3), Quantization.per_tensor(0.05, -3)),),
                  (PadNode((0,), ((0, 0), (1, 2), (3, 0), (0, 0))), Conv2DNode((1,), *_fields(conv))))
    assert graph.tensor_shapes[1] == (1, 14, 12, 3)
    path = tmp_path / "pad.tflite"
    export_tflite(graph, path)
    inputs = rng.integers(-128, 128, (200, 11, 9, 3)).astype(np.int8)
    expected = litert_outputs(path, inputs)
    assert np.array_equal(graph(inputs), expected) and np.array_equal(load_tflite(path)(inputs), expected)
    with pytest.raises(InputError, match="none on the batch"):
        PadNode((0,), ((1, 0), (0, 0), (0, 0), (0, 0)))


def _node_by_node(graph: Graph, inputs: np.ndarray) -> np.ndarray:
    """The graph's operators run one at a time, each as recorded (no PAD applied by its reader)."""
    values = [inputs]
    for node, record in zip(graph.nodes, graph.records):
        values.append(node.run(record, *(values[i] for i in node.inputs)))
    return values[-1]


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_a_pad_read_only_by_a_valid_convolution_is_applied_by_it(dtype: str) -> None:
    """PAD -> VALID CONV_2D / DEPTHWISE_CONV_2D runs as one padded convolution, with the codes of the two
    operators run one at a time (int8 with a zero point, int16; depthwise; padding on every side); a PAD
    that something else reads too, or that the graph returns, runs as itself."""
    from mixprec.integer import PadNode

    rng = np.random.default_rng(19)
    conv, depthwise = random_cnn(rng, True, "VALID", "none").nodes[:2]
    wide = dtype == "int16"  # 16x8: zero points 0, int64 biases

    def valid(node: Conv2DNode, inputs: tuple[int, ...]) -> Conv2DNode:
        output = Quantization.per_tensor(node.output_quant.scale[0], 0 if wide else node.output_quant.zero_point[0])
        return type(node)(inputs, node.weights, node.weight_quant, node.bias.astype(np.int64 if wide else np.int32),
                          output, "VALID", node.stride, node.dilation, "none")

    spec = TensorSpec("input", (1, 11, 9, 3), Quantization.per_tensor(0.05, 0 if wide else -3), dtype)
    first, second = valid(conv, (1,)), valid(depthwise, (3,))
    graph = Graph((spec,), (PadNode((0,), ((0, 0), (1, 2), (3, 0), (0, 0))), first,
                            PadNode((2,), ((0, 0), (2, 2), (1, 1), (0, 0))), second))
    assert graph._plan[0] is None and graph._plan[2] is None  # both PADs applied by their convolutions
    low, high = (-128, 128) if dtype == "int8" else (-32768, 32768)
    inputs = rng.integers(low, high, (40, 11, 9, 3)).astype(dtype)
    inputs[0] = low
    assert np.array_equal(graph(inputs), _node_by_node(graph, inputs))
    assert [row.name for row in graph.profile(inputs, repeats=1)] == ["0:pad", "1:conv_2d", "2:pad",
                                                                      "3:depthwise_conv_2d"]
    shared = Graph((spec,), (PadNode((0,), ((0, 0), (1, 1), (1, 1), (0, 0))), first, valid(conv, (1,))))
    assert shared._plan[0] is not None and np.array_equal(shared(inputs), _node_by_node(shared, inputs))
    alone = Graph((spec,), (PadNode((0,), ((0, 0), (1, 1), (1, 1), (0, 0))),))
    assert alone._plan[0] is not None and alone(inputs).shape == (40, 13, 11, 3)


def test_a_padded_convolution_refuses_what_it_cannot_apply() -> None:
    from mixprec.integer.ops.conv import conv2d_after_pad

    rng = np.random.default_rng(3)
    record = random_cnn(rng, True, "VALID", "none").records[0]
    x = np.zeros((2, 11, 9, 3), np.int8)
    with pytest.raises(InputError, match="VALID after non-negative paddings"):
        conv2d_after_pad(x, record, ((1, -1), (0, 0)))
    with pytest.raises(InputError, match="NHWC input"):
        conv2d_after_pad(x[0], record, ((1, 1), (0, 0)))
    with pytest.raises(InputError, match="VALID after"):
        conv2d_after_pad(x, random_cnn(rng, True, "SAME", "none").records[0], ((1, 1), (0, 0)))


def _fields(node: Conv2DNode) -> tuple:
    return (node.weights, node.weight_quant, node.bias, node.output_quant, node.padding, node.stride, node.dilation,
            node.activation)


def test_a_pytorch_ds_cnn_converts_to_an_int8_graph_identical_to_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    import torch
    from torch import nn

    import mixprec
    from mixprec.integer.build.cnn import cnn_graph_from
    from mixprec.studies.cnn_models import DSCNN

    torch.manual_seed(0)
    model = DSCNN(width=16, blocks=2).eval()
    with pytest.raises(InputError, match="fold the BatchNorms first"):
        cnn_graph_from(list(model.features), torch.randn(8, 1, 49, 10))
    mixprec.fold_batchnorm(model)
    layers = [*model.features, nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head]
    graph = cnn_graph_from(layers, torch.randn(64, 1, 49, 10))
    # the 10x4 stride-2 convolution pads (5, 1): not TFLite's SAME, so an explicit PAD
    assert [node.opcode for node in graph.nodes] == ["PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D",
                                                      "DEPTHWISE_CONV_2D", "CONV_2D", "MAX_POOL_2D", "MEAN",
                                                      "FULLY_CONNECTED"]
    assert graph.nodes[1].activation == "relu" and graph.nodes[2].padding == "SAME"
    path = tmp_path / "ds_cnn.tflite"
    export_tflite(graph, path)
    inputs = np.random.default_rng(1).integers(-128, 128, (300, 49, 10, 1)).astype(np.int8)
    assert np.array_equal(graph(inputs), litert_outputs(path, inputs))
    with pytest.raises(InputError, match="does not convert LayerNorm"):
        cnn_graph_from([nn.Conv2d(1, 4, 3), nn.LayerNorm(4)], torch.randn(2, 1, 8, 8))
    with pytest.raises(InputError, match="groups=2 is neither plain"):
        cnn_graph_from([nn.Conv2d(4, 4, 3, groups=2)], torch.randn(2, 4, 8, 8))


def test_bad_pooling_is_refused() -> None:
    from mixprec.integer import AveragePool2DNode, MaxPool2DNode

    with pytest.raises(InputError, match="padding in \\('SAME', 'VALID'\\)"):
        MaxPool2DNode((0,), (2, 2), (1, 1), "FULL")
    with pytest.raises(InputError, match="filter and stride sizes must be >= 1"):
        AveragePool2DNode((0,), (0, 2))
    with pytest.raises(InputError, match="does not fit the 2x2 input with VALID padding"):
        MaxPool2DNode((0,), (3, 3)).output_shape([(1, 2, 2, 4)])


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_the_native_convolution_is_byte_identical_to_the_numpy_reference(dtype: str) -> None:
    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(13)
    wide = dtype == "int16"
    code_range = 32768 if wide else 128
    for trial in range(40):
        depthwise = bool(trial % 2)
        channels = int(rng.integers(1, 9)) if trial % 4 < 2 else int(rng.integers(14, 40))  # both kernel branches
        out = channels * int(rng.integers(1, 4)) if depthwise else int(rng.integers(1, 24))
        kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
        shape = (1, *kernel, out) if depthwise else (out, *kernel, channels)
        weights = rng.integers(-127, 128, shape).astype(np.int8)
        per = out if trial % 3 else 1
        multiplier = rng.integers(2**30, 2**31 - 1, per).astype(np.int32)
        multiplier[:1] = 0x7FFF0000 + int(rng.integers(0, 0xFFFF))  # the reduced 16x8 form's saturating branch
        window = kernel[0] * kernel[1] * (1 if depthwise else channels)
        # a rescale that maps the typical accumulator (~ range/2 * 74 * sqrt(window)) to tens of steps (hundreds
        # for int16); one trial in eight shifts left instead, the saturating corner of the arithmetic
        typical = int(np.log2(code_range * 74 * np.sqrt(window) / (40 * (256 if wide else 1))))
        shift = (rng.integers(0, 2, per) if trial % 8 == 7 else -typical + rng.integers(-1, 2, per)).astype(np.int32)
        offset = 0 if wide else int(rng.integers(-20, 20))
        low = offset if trial % 3 == 0 else -code_range  # a fused ReLU's clamp in every third trial
        reach = int(code_range * 74 * np.sqrt(window))
        bias = rng.integers(-reach, reach, out).astype(np.int64 if wide else np.int32) if trial % 4 else None
        stride, dilation = (tuple(int(v) for v in rng.integers(1, 3, 2)) for _ in range(2))
        params = ConvParams(weights=weights, bias=bias, input_offset=0 if wide else int(rng.integers(-127, 128)),
                            multiplier=multiplier, shift=shift, output_offset=offset, stride=stride,
                            dilation=dilation, padding="SAME" if trial % 5 else "VALID", depthwise=depthwise,
                            activation_min=low, activation_max=code_range - 1, dtype=dtype)
        x = rng.integers(-code_range, code_range, (int(rng.integers(1, 6)), int(rng.integers(9, 16)),
                                                   int(rng.integers(9, 16)), channels)).astype(dtype)
        expected = conv2d_reference(x, params)
        assert np.array_equal(_conv2d_native(x, params), expected), trial
    # a window of 800 products: int16's long-window path (the sum in int64)
    weights = rng.integers(-127, 128, (6, 5, 5, 32)).astype(np.int8)
    params = ConvParams(weights=weights, bias=None, input_offset=0, multiplier=np.array([1 << 30], np.int32),
                        shift=np.array([-(12 + 8 * wide)], np.int32), output_offset=0, stride=(1, 1), dilation=(1, 1),
                        padding="SAME", dtype=dtype, activation_min=-code_range, activation_max=code_range - 1)
    x = rng.integers(-code_range, code_range, (3, 9, 9, 32)).astype(dtype)
    assert np.array_equal(_conv2d_native(x, params), conv2d_reference(x, params))


def test_the_native_pointwise_gemm_path_is_byte_identical_to_the_numpy_reference() -> None:
    """1x1, stride 1, unpadded int8 convolutions with channels a multiple of 4 and outputs a
    multiple of 16 take the VNNI GEMM with the vector rescale (where the CPU has them): every
    rescale branch (per channel or per tensor, right and left shifts, saturation), both clamps,
    pixel counts that leave tails of the 4-pixel tiles, and extreme codes."""
    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(17)
    for trial in range(24):
        channels, out = int(rng.choice([4, 8, 12, 64])), int(rng.choice([16, 32, 48, 80]))
        weights = rng.integers(-128, 128, (out, 1, 1, channels)).astype(np.int8)
        per = out if trial % 2 else 1
        multiplier = rng.integers(2**30, 2**31 - 1, per).astype(np.int32)
        typical = int(np.log2(128 * 74 * np.sqrt(channels) / 40))
        shift = (rng.integers(0, 3, per) if trial % 6 == 5 else -typical + rng.integers(-1, 2, per)).astype(np.int32)
        offset = int(rng.integers(-20, 20))
        low = offset if trial % 3 == 0 else -128
        bias = rng.integers(-2**20, 2**20, out).astype(np.int32) if trial % 4 else None
        params = ConvParams(weights=weights, bias=bias, input_offset=int(rng.integers(-127, 129)),
                            multiplier=multiplier, shift=shift, output_offset=offset, stride=(1, 1),
                            dilation=(1, 1), padding="VALID", depthwise=False, activation_min=low,
                            activation_max=127, dtype="int8")
        x = rng.integers(-128, 128, (int(rng.integers(1, 4)), int(rng.integers(1, 8)), int(rng.integers(1, 8)),
                                     channels)).astype(np.int8)
        x.flat[:channels] = -128  # the extreme codes the +128 shift maps to 0 and 255
        x.flat[-channels:] = 127
        assert np.array_equal(_conv2d_native(x, params), conv2d_reference(x, params)), trial


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "conv"])
def test_the_native_vector_paths_are_byte_identical_to_the_numpy_reference(depthwise: bool) -> None:
    """Channel counts that are multiples of 16 take the AVX-512 paths where the CPU has them: the
    depthwise kernel's dot products of four window points (odd and even window sizes, a 1x1
    window, one to six quads per output: weights held in registers or read, points outside the
    image, strides and dilations over its padded rows of each sample, a sample split between
    threads), the GEMM (window rows gathered by masked moves of up to 64 bytes or copied whole),
    and the float32 rescale (right shifts of 0 included) or, with a left shift anywhere, the
    saturating two-step one. Depthwise weights prepacked once and packed per call give the same bytes; a pack
    made for other weights is refused."""
    import torch

    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference, native_conv_arguments
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(29 + depthwise)
    for trial in range(30):
        channels = int(rng.choice([16, 32, 48, 64, 80])) if depthwise else int(rng.choice([3, 8, 16, 40]))
        out = channels if depthwise else int(rng.choice([16, 32, 48]))
        kernel = [(3, 3), (1, 1), (2, 2), (1, 3), (3, 1), (4, 3), (5, 1), (3, 5)][trial % 8]
        weights = rng.integers(-127, 128, (1, *kernel, out) if depthwise else (out, *kernel, channels)).astype(np.int8)
        per = out if trial % 2 else 1
        multiplier = rng.integers(2**30, 2**31 - 1, per).astype(np.int32)
        multiplier[0] = [2**30, 2**31 - 1][trial % 2]
        window = kernel[0] * kernel[1] * (1 if depthwise else channels)
        typical = int(np.log2(128 * 74 * np.sqrt(window) / 40))
        if trial % 5 == 4:
            shift = rng.integers(-1, 2, per)  # a left shift somewhere: the saturating rescale
        else:
            shift = -rng.integers(max(typical - 2, 0), typical + 2, per)
            shift[rng.random(per) < 0.2] = 0  # right shifts of 0: no rounding after the high multiply
        offset = int(rng.integers(-20, 20))
        bias = rng.integers(-2**18, 2**18, out).astype(np.int32) if trial % 3 else None
        stride, dilation = ((1, 1), (1, 1)) if trial % 4 == 0 else (tuple(int(v) for v in rng.integers(1, 3, 2))
                                                                 for _ in range(2))
        params = ConvParams(weights=weights, bias=bias, input_offset=int([-127, 128, 0, 5][trial % 4]),
                            multiplier=multiplier, shift=shift.astype(np.int32), output_offset=offset, stride=stride,
                            dilation=dilation, padding="SAME" if trial % 3 else "VALID", depthwise=depthwise,
                            activation_min=offset if trial % 3 == 0 else -128, activation_max=127, dtype="int8")
        x = rng.integers(-128, 128, (int(rng.integers(1, 4)), int(rng.integers(9, 13)), int(rng.integers(9, 13)),
                                     channels)).astype(np.int8)
        x.flat[:channels], x.flat[-channels:] = -128, 127
        expected = conv2d_reference(x, params)
        assert np.array_equal(_conv2d_native(x, params), expected), trial  # weights prepacked once
        arguments = native_conv_arguments(params, x.shape)
        per_call = native.tflite_conv2d(torch.from_numpy(x), *arguments[:-1], None)  # packed by the call
        assert np.array_equal(per_call.numpy(), expected), trial
    if depthwise:  # a depthwise pack made for other weights' shape, multipliers or input offset is refused
        weights, bias, multiplier, shift = params.native_constants
        for other in (native.tflite_depthwise_pack(weights[:, :1].contiguous(), bias, multiplier, shift,
                                                   params.input_offset),
                      native.tflite_depthwise_pack(weights, bias, multiplier[:1], shift[:1], params.input_offset),
                      native.tflite_depthwise_pack(weights, bias, multiplier, shift, params.input_offset - 1)):
            assert other.numel() > 0 or not AVX512_VNNI_BUILD  # without VNNI: nothing packed, nothing to refuse
            with pytest.raises(RuntimeError, match="must come from tflite_depthwise_pack") if other.numel() \
                    else contextlib.nullcontext():
                native.tflite_conv2d(torch.from_numpy(x), *arguments[:-1], other)
        with pytest.raises(RuntimeError, match=r"int32 \[1\] or \[channels\]"):
            native.tflite_depthwise_pack(weights, bias, multiplier[:2], shift[:2], params.input_offset)
        with pytest.raises(RuntimeError, match=r"depthwise weights must be int8 \[1, kh, kw, channels\]"):
            native.tflite_depthwise_pack(weights.repeat(2, 1, 1, 1), bias, multiplier, shift, params.input_offset)


def test_a_depthwise_sample_split_between_threads_is_byte_identical() -> None:
    """One sample large enough (2^22 products and more) that its output rows are split over the
    threads, each laying out the rows it reads: the same bytes as the reference."""
    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(41)
    channels = 144
    params = ConvParams(weights=rng.integers(-127, 128, (1, 3, 3, channels)).astype(np.int8),
                        bias=rng.integers(-2**16, 2**16, channels).astype(np.int32), input_offset=3,
                        multiplier=rng.integers(2**30, 2**31 - 1, channels).astype(np.int32),
                        shift=-rng.integers(8, 11, channels).astype(np.int32), output_offset=-4, stride=(1, 1),
                        dilation=(1, 1), padding="SAME", depthwise=True, activation_min=-128, activation_max=127,
                        dtype="int8")
    x = rng.integers(-128, 128, (1, 61, 57, channels)).astype(np.int8)
    assert 61 * 57 * channels * 9 >= 2**22
    assert np.array_equal(_conv2d_native(x, params), conv2d_reference(x, params))


def _near_boundary(right: int, rng: np.random.Generator) -> tuple[int, int]:
    """A 31-bit multiplier and an accumulator total whose rescaled value (gemmlowp's two roundings, right
    shift ``right``) lies in (-100, 100) and within 2^-18 of a whole number, inside float32's rounding
    errors there (multipliers whose products stay farther from every boundary are drawn again)."""
    totals = np.arange(-100 << right, 100 << right, dtype=np.int64)
    span = 1 << (31 + right)
    tie = (1 << (right - 1)) << 31 if right else 0
    while True:
        multiplier = int(rng.integers(2**30, 2**31))
        # floor(X) = floor(numerator / span): X's distance to a whole number is numerator mod span
        product = totals * multiplier
        numerator = product + (1 << 30) + tie - (right > 0) * (product < -(1 << 30)) * (1 << 31)
        distance = np.minimum(numerator % span, span - numerator % span)
        if distance.min() < span >> 18:
            return multiplier, int(totals[distance.argmin()])


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "conv"])
def test_rescale_near_rounding_boundaries_is_byte_identical(depthwise: bool) -> None:
    """The AVX-512 rescale runs in float32 and redoes in integers the lanes too near a rounding
    boundary: totals placed within 2^-18 of a boundary (one per channel, 31-bit multipliers that
    float32 cannot hold, right shifts 8-13) come out as the integer reference's."""
    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(53 + depthwise)
    offset, input_offset = -3, 1
    for channels in (64, 16):  # 16: a CONV_2D rescales four pixels' registers together
        shift = -rng.integers(8, 14, channels).astype(np.int32)
        multiplier, totals = (np.array(column) for column in zip(*(_near_boundary(int(-r), rng) for r in shift)))
        # a 1x1 window of weight 1: total = x + input_offset + bias, the chosen total where x = 0
        weights = (np.ones((1, 1, 1, channels), np.int8) if depthwise
                   else np.eye(channels, dtype=np.int8)[:, None, None])
        params = ConvParams(weights=weights, bias=(totals - input_offset).astype(np.int32),
                            input_offset=input_offset, multiplier=multiplier.astype(np.int32), shift=shift,
                            output_offset=offset, stride=(1, 1), dilation=(1, 1), padding="VALID",
                            depthwise=depthwise, activation_min=-128, activation_max=127, dtype="int8")
        x = rng.integers(-2, 3, (3, 5, 4, channels)).astype(np.int8)
        x[:, :2] = 0
        assert np.array_equal(_conv2d_native(x, params), conv2d_reference(x, params)), channels


def test_windows_read_in_place_are_byte_identical_to_the_numpy_reference() -> None:
    """Int8 convolutions whose window rows are contiguous read each window's rows in place, rounded up to 4
    bytes under zero weights (1 channel x 4 columns as the DS-CNN's first layer, 4 x 3, 8 x 1; 1 x 3 as
    ResNet-8's stem, 3 x 3, 5 x 1, which read bytes past each row): strides, a vertical dilation, SAME and
    VALID, per-tensor and per-channel rescales, weights prepacked once or packed per call, and the reference's
    bytes. A prepacked tensor made for another geometry is refused."""
    import torch

    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(61)
    cases = [(1, (10, 4), (2, 2), (1, 1), "VALID"), (4, (3, 3), (1, 2), (2, 1), "VALID"),
             (8, (2, 1), (2, 1), (1, 1), "VALID"), (1, (3, 3), (1, 1), (1, 1), "SAME"),
             (3, (3, 3), (2, 2), (1, 1), "SAME"), (5, (2, 1), (1, 1), (2, 1), "VALID")]
    for trial, (channels, kernel, stride, dilation, padding) in enumerate(cases):
        out = 32
        per = out if trial % 2 else 1
        params = ConvParams(weights=rng.integers(-127, 128, (out, *kernel, channels)).astype(np.int8),
                            bias=rng.integers(-2**12, 2**12, out).astype(np.int32),
                            input_offset=int(rng.integers(-9, 9)),
                            multiplier=rng.integers(2**30, 2**31, per).astype(np.int32),
                            shift=-rng.integers(7, 10, per).astype(np.int32), output_offset=-5, stride=stride,
                            dilation=dilation, padding=padding, depthwise=False, activation_min=-128,
                            activation_max=127, dtype="int8")
        x = rng.integers(-128, 128, (3, 21, 11, channels)).astype(np.int8)
        expected = conv2d_reference(x, params)
        assert np.array_equal(_conv2d_native(x, params), expected), trial
        weights, bias, multiplier, shift = params.native_constants
        (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
        _, out_h, out_w, _ = params.output_shape(x.shape)
        top = max(0, (out_h - 1) * sh + (kh - 1) * dh + 1 - 21) // 2 if padding == "SAME" else 0
        left = max(0, (out_w - 1) * sw + (kw - 1) * dw + 1 - 11) // 2 if padding == "SAME" else 0
        geometry = (sh, sw, dh, dw, top, left, out_h, out_w)
        per_call = native.tflite_conv2d(torch.from_numpy(x), weights, bias, multiplier, shift, *geometry,
                                        params.input_offset, -5, -128, 127, False, None)
        assert np.array_equal(per_call.numpy(), expected), trial
    other = native.tflite_conv2d_pack(weights, bias, 21, 12, channels, *geometry, params.input_offset)
    # without AVX512-VNNI the build packs nothing (an empty pack: no pack), so there is nothing to refuse
    assert other.numel() > 0 or not AVX512_VNNI_BUILD
    with pytest.raises(RuntimeError, match="must come from tflite_conv2d_pack for this geometry") if other.numel() \
            else contextlib.nullcontext():
        native.tflite_conv2d(torch.from_numpy(x), weights, bias, multiplier, shift, *geometry, params.input_offset,
                             -5, -128, 127, False, other)


@pytest.mark.parametrize(("kernel", "stride", "dilation", "padding"),
                         [((3, 3), (1, 1), (1, 1), "SAME"), ((3, 3), (2, 2), (1, 1), "SAME"),
                          ((1, 1), (2, 2), (1, 1), "VALID"), ((3, 2), (1, 1), (2, 1), "VALID")])
def test_windows_read_in_place_over_many_stretches_and_threads_are_byte_identical(
        kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], padding: str) -> None:
    """A batch whose output pixels span many of the stretches whose padded rows are laid out together (1,024
    pixels, starting and ending inside images and rows), split over two threads: the reference's bytes."""
    import torch

    from mixprec.integer.ops.conv import ConvParams, _conv2d_native, conv2d_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(67)
    channels, out = 16, 32
    params = ConvParams(weights=rng.integers(-127, 128, (out, *kernel, channels)).astype(np.int8),
                        bias=rng.integers(-2**12, 2**12, out).astype(np.int32), input_offset=3,
                        multiplier=rng.integers(2**30, 2**31, out).astype(np.int32),
                        shift=-rng.integers(7, 10, out).astype(np.int32), output_offset=-5, stride=stride,
                        dilation=dilation, padding=padding, depthwise=False, activation_min=-128,
                        activation_max=127, dtype="int8")
    x = rng.integers(-128, 128, (7, 37, 29, channels)).astype(np.int8)  # 7,511 pixels at stride 1
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert np.array_equal(_conv2d_native(x, params), conv2d_reference(x, params))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "conv"])
def test_a_convolution_finishing_with_an_add_gives_the_add_of_its_codes(depthwise: bool) -> None:
    """A residual ADD finished inside the convolution (the VNNI GEMM per tile, other paths after the whole
    output): the bytes of the convolution, then the int8 ADD's reference, with the convolution's codes as
    the ADD's first or second operand, 16 and 48 channels, batch 1 and 3; bad residuals refused."""
    import torch

    from mixprec.integer.ops.conv import ConvParams, conv2d_reference, native_conv_arguments
    from mixprec.integer.ops.elementwise import AddParams, add_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(73 + depthwise)
    for trial, (channels, batch, residual_first) in enumerate([(16, 1, False), (48, 3, True), (16, 3, True),
                                                              (48, 1, False)]):
        shape = (1, 3, 3, channels) if depthwise else (channels, 3, 3, channels)
        params = ConvParams(weights=rng.integers(-127, 128, shape).astype(np.int8),
                            bias=rng.integers(-2**12, 2**12, channels).astype(np.int32), input_offset=3,
                            multiplier=rng.integers(2**30, 2**31, channels).astype(np.int32),
                            shift=-rng.integers(7, 10, channels).astype(np.int32), output_offset=-5, stride=(1, 1),
                            dilation=(1, 1), padding="SAME", depthwise=depthwise, activation_min=-128,
                            activation_max=127, dtype="int8")
        add = AddParams(a_offset=int(rng.integers(-20, 20)), b_offset=int(rng.integers(-20, 20)),
                        a_multiplier=int(rng.integers(2**30, 2**31)), a_shift=-1,
                        b_multiplier=int(rng.integers(2**30, 2**31)), b_shift=-2,
                        output_multiplier=int(rng.integers(2**30, 2**31)), output_shift=-17, output_offset=-128,
                        activation_min=-128 if trial % 2 else -100, activation_max=127)
        x = rng.integers(-128, 128, (batch, 9, 11, channels)).astype(np.int8)
        other = rng.integers(-128, 128, (batch, 9, 11, channels)).astype(np.int8)
        conv = conv2d_reference(x, params)
        expected = add_reference(other, conv, add) if residual_first else add_reference(conv, other, add)
        arguments = native_conv_arguments(params, x.shape)
        got = native.tflite_conv2d(torch.from_numpy(x), *arguments, torch.from_numpy(other), add.int8_table,
                                   add.int8_fit, residual_first)
        assert np.array_equal(got.numpy(), expected), trial
    residual = torch.from_numpy(other)
    with pytest.raises(RuntimeError, match="of the convolution's output shape"):
        native.tflite_conv2d(torch.from_numpy(x), *arguments, residual[:, :4].contiguous(), add.int8_table,
                             add.int8_fit, False)
    with pytest.raises(RuntimeError, match="65,540 contiguous int8 codes"):
        native.tflite_conv2d(torch.from_numpy(x), *arguments, residual, add.int8_table[:100], add.int8_fit, False)
    with pytest.raises(RuntimeError, match="7 contiguous float32"):
        native.tflite_conv2d(torch.from_numpy(x), *arguments, residual, add.int8_table, add.int8_fit[:3], False)
    with pytest.raises(RuntimeError, match="come with a residual"):
        native.tflite_conv2d(torch.from_numpy(x), *arguments, None, add.int8_table, None, False)
