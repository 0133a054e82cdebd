"""MEAN, RESHAPE, QUANTIZE and DEQUANTIZE: byte-identical to LiteRT's reference kernels,
read back by load_tflite, and bad input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cpu_kinds import AVX512_BUILD
from test_integer_fc import litert_outputs

from mixprec import InputError
from mixprec.integer import (
    AddNode,
    DequantizeNode,
    Graph,
    MeanNode,
    Quantization,
    QuantizeNode,
    ReshapeNode,
    TensorSpec,
    export_tflite,
    load_tflite,
)
from mixprec.integer.core.rounding import round_half_away
from mixprec.integer.ops.conversions import quantize

needs_litert = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("ai_edge_litert", "tflite")),
    reason="needs ai-edge-litert and tflite")


def assert_matches_litert(graph: Graph, path: Path, *inputs: np.ndarray) -> np.ndarray:
    """Export, run in LiteRT's reference kernels and in mixprec; outputs must match bit for bit."""
    export_tflite(graph, path)
    expected, got = litert_outputs(path, *inputs), graph(*inputs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))
    reloaded = load_tflite(path)(*inputs)
    assert np.array_equal(reloaded.view(np.uint8), expected.view(np.uint8))
    return got


def random_quant(rng: np.random.Generator, low: float, high: float) -> Quantization:
    return Quantization.per_tensor(float(rng.uniform(low, high)), int(rng.integers(-40, 40)))


def test_the_native_mean_sums_equal_numpy_in_int8_and_int16() -> None:
    """Consecutive axes take the native int32 sums (the largest magnitudes included; inner widths of 64
    channels and more, summed 64 at a time in registers, with tails); others numpy's."""
    from mixprec.integer.ops.mean import exact_sums
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(3)
    for dtype, low, high in (("int8", -128, 128), ("int16", -32768, 32768)):
        for shape, axes in (((7, 5, 3, 16), (1, 2)), ((7, 5, 3, 16), (1,)), ((7, 5, 3, 16), (3,)),
                            ((7, 5, 3, 16), (1, 3)), ((3, 2**16), (1,)), ((4, 9, 5, 64), (1, 2)),
                            ((3, 6, 130), (1,))):
            x = rng.integers(low, high, shape).astype(dtype)
            x[0] = low  # a whole row at the extreme: the sums' largest magnitude
            assert np.array_equal(exact_sums(x, axes), x.sum(axis=axes, dtype=np.int64)), (dtype, shape, axes)
    import torch

    with pytest.raises(RuntimeError, match="contiguous int8 or int16"):
        native.tflite_sum_middle(torch.zeros(2, 3, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="more elements than an exact int32 sum"):
        native.tflite_sum_middle(torch.zeros(1, 2**16 + 1, 1, dtype=torch.int16))


def test_the_native_mean_equals_the_numpy_reference_in_int8_and_int16() -> None:
    """MEAN's fused native sums and rescale (16 outputs at a time, with tails) give the reference's codes:
    right and left shifts (scale ratios from 2^-9 to 2^6), zero points at the ends of the range, rows at
    the extremes, outputs clamped at both ends; other axes go to numpy."""
    from mixprec.integer.ops.mean import MeanParams, mean, mean_params, mean_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(11)
    cases = (((6, 5, 3, 64), (1, 2)), ((6, 5, 3, 20), (1, 2)), ((5, 7, 130), (1,)), ((4, 9), (1,)),
             ((5, 4, 3, 16), (1, 3)), ((2, 3, 4, 5), (2, 3)))
    for trial in range(24):
        dtype = "int8" if trial % 2 == 0 else "int16"
        shape, axes = cases[trial % len(cases)]
        low, high = (-128, 127) if dtype == "int8" else (-32768, 32767)
        x = rng.integers(low, high + 1, shape).astype(dtype)
        x[0], x[-1] = low, high
        zero_in, zero_out = (int(rng.choice([low, high, 0, 17])), int(rng.integers(-20, 20))) if dtype == "int8" \
            else (0, 0)
        params = mean_params(shape, axes, trial % 3 == 0, 0.02, zero_in, 0.02 * 2.0 ** rng.uniform(-6, 9), zero_out,
                             dtype)
        assert np.array_equal(mean(x, params), mean_reference(x, params)), (trial, dtype, shape, axes, params)
    import torch

    with pytest.raises(RuntimeError, match="multiplier must lie in"):
        native.tflite_mean_middle(torch.zeros(2, 3, 4, dtype=torch.int8), 0, 2**31, -3, 0, -128, 127)
    with pytest.raises(RuntimeError, match="clamp must lie inside"):
        native.tflite_mean_middle(torch.zeros(2, 3, 4, dtype=torch.int8), 0, 2**30, -3, 0, -128, 300)
    with pytest.raises(InputError, match="built for 15 elements"):
        mean_reference(np.zeros((2, 4, 4), np.int8), mean_params((2, 3, 5), (1, 2), False, 0.1, 0, 0.1, 0))
    with pytest.raises(InputError, match="MEAN's multiplier lies in"):
        MeanParams((1,), False, 3, 0, 0, 2**31, -3)


@needs_litert
@pytest.mark.parametrize(("shape", "axes", "keep_dims"), [
    ((8, 6), (1,), False), ((8, 6), (1, 2), True), ((8, 1, 6), (1, 2), True), ((5, 3, 7), (2,), False),
    ((13,), (1,), False), ((4, 3, 5), (1, 3), False)])
def test_mean_is_byte_identical_to_litert(shape: tuple[int, ...], axes: tuple[int, ...], keep_dims: bool,
                                          tmp_path: Path) -> None:
    rng = np.random.default_rng(len(shape) * 100 + sum(shape))
    for trial in range(4):
        q_in = random_quant(rng, 0.01, 0.2)
        # Equal quantization, a finer and a coarser output grid.
        q_out = q_in if trial == 0 else random_quant(rng, 0.002 if trial == 1 else 0.05, 0.05 if trial == 1 else 0.5)
        graph = Graph((TensorSpec("x", (1, *shape), q_in),), (MeanNode((0,), axes, q_out, keep_dims),))
        x = rng.integers(-128, 128, (1000, *shape)).astype(np.int8)
        x[0], x[1] = -128, 127
        got = assert_matches_litert(graph, tmp_path / f"mean{trial}.tflite", x)
        # Against the real-valued mean: the final rounding (1/2 step), the high multiply's
        # rounding (1/2 of 2^-right_shift steps) and the folded multiplier's error.
        record = graph.records[0]
        centred = x.astype(np.float64) - q_in.zero_point[0]
        real = (q_in.scale32[0] * centred).mean(axis=axes, keepdims=keep_dims)
        ideal = np.clip(real / q_out.scale32[0] + q_out.zero_point[0], -128, 127)
        exact_ratio = float(q_in.scale32[0]) / float(q_out.scale32[0]) / record.count
        used_ratio = record.multiplier * 2.0 ** (record.shift - 31)
        bound = 0.5 + 0.5 * 2.0 ** min(record.shift, 0) + np.abs(centred.sum(axis=axes)).max() * abs(
            used_ratio - exact_ratio)
        assert np.abs(got - ideal).max() <= bound


@needs_litert
def test_reshape_keeps_bytes_and_feeds_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    q = random_quant(rng, 0.02, 0.1)
    graph = Graph((TensorSpec("x", (1, 8, 6), q),),
                  (ReshapeNode((0,), (8, 1, 6)), MeanNode((1,), (1, 2), random_quant(rng, 0.01, 0.05), True),
                   ReshapeNode((2,), (6,))))
    x = rng.integers(-128, 128, (1000, 8, 6)).astype(np.int8)
    assert assert_matches_litert(graph, tmp_path / "reshape.tflite", x).shape == (1000, 6)
    flat = Graph((TensorSpec("x", (1, 8, 6), q),), (ReshapeNode((0,), (48,)),))
    assert np.array_equal(flat(x), x.reshape(1000, 48))
    assert flat.output_quant == q


@needs_litert
def test_the_native_requantize_equals_the_numpy_reference() -> None:
    """QUANTIZE between grids (int8 and int16 on either side) by the native kernel gives the reference's
    codes: scale ratios from 2^-12 to 2^12 (right and left shifts, products saturating int32), offsets at
    the ends of the range, lengths with tails of fewer than 16 elements, outputs clamped at both ends."""
    from mixprec.integer.ops.conversions import RequantizeParams, requantize, requantize_params, requantize_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(5)
    for trial in range(32):
        source, target = [("int8", "int16"), ("int16", "int8"), ("int8", "int8"), ("int16", "int16")][trial % 4]
        low, high = (-128, 127) if source == "int8" else (-32768, 32767)
        x = rng.integers(low, high + 1, int(rng.integers(1, 200))).astype(source)
        x[0], x[-1] = low, high
        zero_in = int(rng.choice([low, high, 0, 3])) if source == "int8" else 0
        zero_out = int(rng.integers(-128, 128)) if target == "int8" else 0
        params = requantize_params(0.01, zero_in, 0.01 * 2.0 ** rng.uniform(-12, 12), zero_out, source, target)
        assert np.array_equal(requantize(x, params), requantize_reference(x, params)), (trial, params)
    import torch

    with pytest.raises(RuntimeError, match="multiplier must lie in"):
        native.tflite_requantize(torch.zeros(4, dtype=torch.int8), 0, 2**30, 31, 0, False)
    with pytest.raises(RuntimeError, match="contiguous int8 or int16"):
        native.tflite_requantize(torch.zeros(4, dtype=torch.int32), 0, 2**30, 0, 0, False)
    with pytest.raises(InputError, match="requantization multiplier lies in"):
        RequantizeParams(0, 2**30, 31, 0)


def test_the_native_add_equals_the_numpy_reference() -> None:
    """ADD of two same-shaped tensors by the native kernel (int8: its table of every pair's code) gives
    the reference's codes, int8 and int16:
    scales from 1/64 to 64 times apart (both inputs' multipliers below one, the output's shift deep),
    zero points at the ends of the range, every activation, lengths with tails of fewer than 16 elements
    and long enough to split over threads, inputs at the ends of the code range."""
    from mixprec.integer.ops.elementwise import AddParams, add, add_reference
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    import torch

    rng = np.random.default_rng(9)
    for trial in range(24):
        dtype = "int8" if trial % 3 else "int16"
        low, high = (-128, 127) if dtype == "int8" else (-32768, 32767)
        length = int(rng.integers(1, 200)) if trial % 4 else 300_001
        a, b = (rng.integers(low, high + 1, length).astype(dtype) for _ in range(2))
        a[0], b[0], a[-1], b[-1] = low, high, high, high
        zero_points = [int(rng.choice([-128, 127, 0, 5])) if dtype == "int8" else 0 for _ in range(3)]
        scales = [0.01 * 2.0 ** rng.uniform(-6, 6) for _ in range(3)]
        activation = ("none", "relu", "relu6")[trial % 3] if dtype == "int8" else "none"
        graph = Graph((TensorSpec("a", (1, length), Quantization.per_tensor(scales[0], zero_points[0]), dtype),
                       TensorSpec("b", (1, length), Quantization.per_tensor(scales[1], zero_points[1]), dtype)),
                      (AddNode((0, 1), Quantization.per_tensor(scales[2], zero_points[2]), activation),))
        params = graph.records[0]
        assert isinstance(params, AddParams)
        assert np.array_equal(add(a[None], b[None], params), add_reference(a[None], b[None], params)), trial
        if dtype == "int8":  # the lookup table: every pair of codes
            pairs = np.arange(-128, 128, dtype=np.int8)
            every = add_reference(np.repeat(pairs, 256)[None], np.tile(pairs, 256)[None], params)
            assert np.array_equal(params.int8_table.numpy()[:65536], every[0]), trial
            fit = params.int8_fit  # the estimate serves (margins below 2) and the kernel gives every pair's code
            if AVX512_BUILD:
                assert 0 <= fit[3] < 2 ** -8 and 1 - 2 ** -8 < fit[4] <= 1, (trial, fit)
            else:  # the estimate is an AVX-512 kernel's: elsewhere the margin 2 says "read the table"
                assert fit[3] == 2, (trial, fit)
            every_a, every_b = (torch.from_numpy(np.ascontiguousarray(v)) for v in
                                (np.repeat(pairs, 256), np.tile(pairs, 256)))
            assert np.array_equal(native.tflite_add_lookup(every_a, every_b, params.int8_table, fit).numpy(),
                                  every[0]), trial
    # exact ties, which the rescales round away from zero and floor(g) rounds up: (a + b) / 2 for equal input
    # scales and twice their output scale, zero points 0. The estimate without margins misses every negative
    # odd sum; with them, none.
    pairs = np.arange(-128, 128, dtype=np.int8)
    graph = Graph((TensorSpec("a", (1, 4), Quantization.per_tensor(0.1, 0)),
                   TensorSpec("b", (1, 4), Quantization.per_tensor(0.1, 0))),
                  (AddNode((0, 1), Quantization.per_tensor(0.2, 0), "none"),))
    params = graph.records[0]
    every = add_reference(np.repeat(pairs, 256)[None], np.tile(pairs, 256)[None], params)[0]
    every_a, every_b = (torch.from_numpy(np.ascontiguousarray(v)) for v in (np.repeat(pairs, 256), np.tile(pairs, 256)))
    fit = params.int8_fit
    assert np.array_equal(native.tflite_add_lookup(every_a, every_b, params.int8_table, fit).numpy(), every)
    if AVX512_BUILD:
        assert 0 < fit[3] < 2 ** -8, fit
        unflagged = fit.clone()
        unflagged[3], unflagged[4] = 0.0, 1.0
        wrong = native.tflite_add_lookup(every_a, every_b, params.int8_table, unflagged).numpy() != every
        sums = np.repeat(pairs, 256).astype(int) + np.tile(pairs, 256)
        assert np.array_equal(wrong, (sums < 0) & (sums % 2 == 1))
    else:  # the estimate is an AVX-512 kernel's: elsewhere the margin 2 says "read the table"
        assert fit[3] == 2, fit
        unflagged = fit.clone()
    table_only = unflagged.clone()  # low = 2 flags every lane (tflite_add_fit's answer where the estimate fails)
    table_only[0], table_only[3] = 99.0, 2.0
    assert np.array_equal(native.tflite_add_lookup(every_a, every_b, params.int8_table, table_only).numpy(), every)
    codes = torch.zeros(4, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="shifts in"):
        native.tflite_add(codes, codes, 0, 0, 2**30, 1, 2**30, 0, 2**30, 0, 0, -128, 127)
    with pytest.raises(RuntimeError, match="of a's type and shape"):
        native.tflite_add(codes, torch.zeros(5, dtype=torch.int8), 0, 0, 2**30, 0, 2**30, 0, 2**30, 0, 0, -128, 127)
    with pytest.raises(RuntimeError, match="activation range"):
        native.tflite_add(codes, codes, 0, 0, 2**30, 0, 2**30, 0, 2**30, 0, 0, -128, 200)
    with pytest.raises(RuntimeError, match="65,540 contiguous int8 codes"):
        native.tflite_add_lookup(codes, codes, codes, torch.zeros(7))
    table = torch.zeros(65540, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="7 contiguous float32"):
        native.tflite_add_lookup(codes, codes, table, torch.zeros(6))
    with pytest.raises(RuntimeError, match="activation range"):
        native.tflite_add_fit(table, 0, 0, 2**30, 0, 2**30, 0, 2**30, 0, 0, -128, 200)


def test_the_native_input_quantization_equals_nearest_codes() -> None:
    """Float32 NCHW images onto a graph's NHWC grid by the native kernel: the codes of
    Quantization.nearest_codes (the quotient in double, ties to even) for values at exact ties, far
    outside the range and infinite, int8 and int16; NaN refused."""
    import torch

    from mixprec.integer.build.mix import graph_input
    from mixprec.integer.graph.nodes import ReshapeNode
    from mixprec.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.load_error()}")
    rng = np.random.default_rng(17)
    for dtype, scale, zero_point in (("int8", 0.0125, -7), ("int8", 0.1, 127), ("int16", 0.001, 0)):
        quant = Quantization.per_tensor(scale, zero_point)
        graph = Graph((TensorSpec("x", (1, 5, 4, 3), quant, dtype),), (ReshapeNode((0,), (60,)),))
        x = torch.from_numpy(rng.normal(0, 40 * scale, (6, 3, 5, 4)).astype(np.float32))
        step = float(np.float32(scale))
        x[0, 0, 0, :] = torch.tensor([0.5, 1.5, -0.5, -2.5]) * step  # ties (exact where the product is)
        x[1, 1, :, 0] = torch.tensor([1e9, -1e9, float("inf"), float("-inf"), 3.0])
        expected = quant.nearest_codes(x.permute(0, 2, 3, 1).numpy(), dtype)
        assert np.array_equal(graph_input(graph, x), expected), dtype
    for at in ((2, 2, 2, 2), (3, 1, 4, 1)):  # in a block of 8 and in a plane's tail (20 = 8 + 8 + 4 values)
        y = x.clone()
        y[at] = float("nan")
        with pytest.raises(RuntimeError, match="holds NaN"):
            graph_input(graph, y)


def test_quantize_requantize_and_dequantize_are_byte_identical_to_litert(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for _ in range(4):
        q_in, q_out = random_quant(rng, 0.01, 0.2), random_quant(rng, 0.01, 0.2)
        x = rng.integers(-128, 128, (1000, 16)).astype(np.int8)
        assert_matches_litert(Graph((TensorSpec("x", (1, 16), q_in),), (QuantizeNode((0,), q_out),)),
                              tmp_path / "requantize.tflite", x)
        assert_matches_litert(Graph((TensorSpec("x", (1, 16), q_in),), (DequantizeNode((0,)),)),
                              tmp_path / "dequantize.tflite", x)
        scale = q_out.scale32[0]
        real = (rng.standard_normal((1000, 16)) * scale * 50).astype(np.float32)
        # Exact ties (x.5 steps, both signs), saturation, infinities, the largest floats.
        real[0, :8] = np.array([0.5, -0.5, 1.5, -2.5, 300, -300, np.inf, -np.inf], np.float32) * scale
        real[1, :2] = np.array([2e9, -2e9], np.float32) * scale  # beyond int8, inside int32
        graph = Graph((TensorSpec("x", (1, 16), None, "float32"),), (QuantizeNode((0,), q_out),))
        in_int32 = real.copy()
        # LiteRT casts x / scale to int32, undefined in C++ beyond its range (x86 gives -2^31, so
        # +inf becomes -128); mixprec saturates instead, checked below.
        in_int32[0, 6:8] = 0
        assert_matches_litert(graph, tmp_path / "quantize.tflite", in_int32)
        real[1, 2:4] = [np.finfo(np.float32).max, -np.finfo(np.float32).max]
        assert graph(real)[0, 6:8].tolist() == [127, -128] and graph(real)[1, 2:4].tolist() == [127, -128]


def test_round_half_away_is_exact_at_the_float32_edges() -> None:
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    values = np.array([below_half, -below_half, 0.5, -0.5, 2.5, -2.5, 8388607.5, 1e30, np.inf, -0.0], np.float32)
    assert round_half_away(values).tolist() == [0, 0, 1, -1, 3, -3, 8388608, float(np.float32(1e30)), np.inf, 0]


def test_integer_ops_refuse_bad_input() -> None:
    q = Quantization.per_tensor(0.1, 0)
    with pytest.raises(InputError, match="axis 0 is the batch"):
        Graph((TensorSpec("x", (1, 8, 6), q),), (MeanNode((0,), (0,), q),))
    with pytest.raises(InputError, match=r"cannot turn \(8, 6\) into \(7, 7\)"):
        Graph((TensorSpec("x", (1, 8, 6), q),), (ReshapeNode((0,), (7, 7)),))
    with pytest.raises(InputError, match="takes int8 or int16 inputs, but tensor 0 is float32"):
        Graph((TensorSpec("x", (1, 8), None, "float32"),), (MeanNode((0,), (1,), q),))
    with pytest.raises(InputError, match="float32 tensors carry no quantization"):
        TensorSpec("x", (1, 8), q, "float32")
    with pytest.raises(InputError, match="int8 zero point must lie in"):
        Quantization.per_tensor(0.1, 200)
    with pytest.raises(InputError, match="NaN has no int8 code"):
        quantize(np.array([1.0, np.nan], np.float32), 0.1, 0)
    graph = Graph((TensorSpec("x", (1, 4), None, "float32"),), (QuantizeNode((0,), q), DequantizeNode((1,))))
    with pytest.raises(InputError, match="must be a numpy array of float32, got int8"):
        graph(np.zeros((2, 4), np.int8))
    codes = np.array([0, 1, -2, 127], np.float64)  # 0.05 / 0.1 is a tie in float32: away from zero
    expected = (float(np.float32(0.1)) * codes).astype(np.float32)
    assert np.array_equal(graph(np.array([[0.04, 0.05, -0.15, 20.0]], np.float32))[0], expected)


@needs_litert
def test_load_tflite_refuses_unsupported_tensor_types(tmp_path: Path) -> None:
    import tflite

    q = Quantization.per_tensor(0.1, 0)
    path = tmp_path / "mean.tflite"
    export_tflite(Graph((TensorSpec("x", (1, 8, 6), q),), (MeanNode((0,), (1,), q),)), path)
    data = bytearray(path.read_bytes())
    subgraph = tflite.Model.GetRootAs(bytes(data), 0).Subgraphs(0)
    output = subgraph.Tensors(int(subgraph.OutputsAsNumpy()[0]))
    offset = output._tab.Offset(6)  # the tensor's type (a byte)
    assert data[output._tab.Pos + offset] == tflite.TensorType.INT8
    data[output._tab.Pos + offset] = tflite.TensorType.INT16
    (tmp_path / "int16.tflite").write_bytes(bytes(data))
    with pytest.raises(InputError, match="operator 0 \\(MEAN\\) maps INT8 to INT16; mixprec supports INT8 or INT16 to "
                                         "the same type"):
        load_tflite(tmp_path / "int16.tflite")
