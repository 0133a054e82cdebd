"""Integer layer norm, attention, embedding and positional encoding; the encoder stacks
example's goldens and parity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mixprec import InputError
from mixprec.integer import Graph, Quantization, TensorSpec
from mixprec.integer.graph.nodes import AddConstantNode, EmbeddingNode
from mixprec.integer.ops.attention import (
    linear_attention_int8,
    linear_attention_int8_params,
    softmax_attention,
    softmax_attention_params,
)
from mixprec.integer.ops.layer_norm import integer_sqrt, layer_norm, layer_norm_params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_integer_sqrt_is_exact() -> None:
    rng = np.random.default_rng(0)
    n = np.concatenate([rng.integers(0, 2**62, 100_000), np.array([0, 1, 2, 3, 4, 2**62 - 1, (2**31 - 1) ** 2])])
    root = integer_sqrt(n.astype(np.int64))
    assert all(r * r <= v < (r + 1) * (r + 1) for r, v in zip(root.tolist()[-7:], n.tolist()[-7:]))
    assert np.all(root * root <= n) and np.all((root + 1) * (root + 1) > n)


def test_layer_norm_is_within_one_step_of_float() -> None:
    rng = np.random.default_rng(1)
    for width, (s_in, z_in), (s_out, z_out) in ((8, (0.05, 3), (0.03, -5)), (64, (0.2, -20), (0.02, 10))):
        gamma, beta = rng.uniform(-2, 2, width), rng.uniform(-1, 1, width)
        params = layer_norm_params(gamma, beta, 1e-5, s_in, z_in, s_out, z_out)
        x = rng.integers(-128, 128, (20_000, width)).astype(np.int8)
        x[0] = 7  # a constant row: zero variance gives beta
        got = layer_norm(x, params)
        x_real = Quantization.per_tensor(s_in, z_in).values_of(x)
        reference = torch.nn.functional.layer_norm(torch.from_numpy(x_real), (width,), torch.from_numpy(gamma),
                                                   torch.from_numpy(beta), 1e-5).numpy()
        ideal = np.clip(reference / np.float32(s_out) + z_out, -128, 127)
        # The final rounding (1/2 step), beta's rounding (1/2 step), and the truncated
        # reciprocal square root (relative error below sqrt(V) / 2^30).
        assert np.abs(got - ideal).max() <= 1.0 + 0.01
        assert np.array_equal(got[0], np.clip(np.round(beta / np.float32(s_out)) + z_out, -128, 127))


def quantized(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, shape).astype(np.int8)


def test_softmax_attention_matches_its_float_definition() -> None:
    rng = np.random.default_rng(2)
    grids = {"q": (0.02, -10), "k": (0.025, 5), "v": (0.03, 2), "score": (0.01, 0), "out": (0.02, -3)}
    params = softmax_attention_params(8, grids["q"], grids["k"], grids["v"], grids["score"], grids["out"])
    q, k, v = (quantized(rng, (2000, 8, 8)) for _ in range(3))
    got = softmax_attention(q, k, v, params)
    Q, K, V = (Quantization.per_tensor(*grids[n]).values_of(c) for c, n in ((q, "q"), (k, "k"), (v, "v")))
    scores = np.clip(np.round(Q @ np.swapaxes(K, -1, -2) / math.sqrt(8) / np.float32(0.01)), -128, 127)
    probabilities = np.exp(scores * np.float32(0.01))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    on_grid = np.clip(np.round(probabilities * 256), 0, 255) / 256  # the 1/256 probability grid
    ideal = np.clip(on_grid @ V / np.float32(0.02) - 3, -128, 127)
    # The scores' two roundings (high multiply, then shift) can move a score one code from
    # the exact rounding, and a probability near a 1/256 step then lands on the neighbour:
    # measured worst 2.28 output steps.
    assert np.abs(got - ideal).max() <= 2.5


def test_linear_attention_int8_matches_its_float_definition() -> None:
    rng = np.random.default_rng(3)
    grids = {"q": (0.05, -128), "k": (0.04, -128), "v": (0.03, 2), "out": (0.02, -3)}
    params = linear_attention_int8_params(1.0, grids["q"], grids["k"], grids["v"], grids["out"])
    q, k, v = (quantized(rng, (2000, 8, 8)) for _ in range(3))
    got = linear_attention_int8(q, k, v, params)
    Q, K, V = (Quantization.per_tensor(*grids[n]).values_of(c) for c, n in ((q, "q"), (k, "k"), (v, "v")))
    den = (Q * K.sum(axis=-2, keepdims=True)).sum(axis=-1, keepdims=True) + 1.0
    ideal = np.clip((Q @ (np.swapaxes(K, -1, -2) @ V)) / den / np.float32(0.02) - 3, -128, 127)
    assert np.abs(got - ideal).max() <= 0.5 + 1e-3  # measured 0.50001: the final rounding
    with pytest.raises(InputError, match="attention shapes do not match"):
        linear_attention_int8(q, k[:, :4], v, params)


def test_embedding_keeps_its_zero_point_and_refuses_bad_ids() -> None:
    table_quant = Quantization.per_tensor(0.1, 37)
    table = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    graph = Graph((TensorSpec("ids", (1, 4), None, "int32"),), (EmbeddingNode((0,), table, table_quant),))
    ids = np.array([[0, 15, 3, 3]], np.int32)
    out = graph(ids)
    assert np.allclose(graph.output_quant.values_of(out), (table[ids].astype(float) - 37) * np.float32(0.1))
    with pytest.raises(InputError, match="2 token ids lie outside 0..15"):
        graph(np.array([[0, 16, -1, 3]], np.int32))
    with pytest.raises(InputError, match="must be a numpy array of int32"):
        graph(ids.astype(np.int64))
    with pytest.raises(InputError, match=r"adds a \(3, 16\) constant to \(4, 16\)"):
        Graph(graph.inputs, (graph.nodes[0], AddConstantNode((1,), table[:3], table_quant, table_quant)))


@pytest.fixture(scope="module")
def encoder_example(import_example):  # noqa: ANN001, ANN201
    return import_example("encoder_stacks"), import_example("example_modes").load_model


@pytest.mark.parametrize(("attention", "measured_worst", "measured_drop"), [("softmax", 8.78, 0.0022),
                                                                           ("linear", 13.50, 0.0059)])
def test_encoder_stack_goldens_and_parity(encoder_example, attention: str, measured_worst: float,  # noqa: ANN001
                                          measured_drop: float) -> None:
    from mixprec.integer.graph.simulate import operator_errors
    from mixprec.integer.models.encoder import build_encoder_graph

    example, load_model = encoder_example
    model = load_model(f"encoder_{attention}", lambda: example.make_model(attention))
    graph = build_encoder_graph(model, example.make_set(512, seed=3)[0])
    x, y = example.held_out_set()
    assert len(x) == 1024 and len({tuple(row) for row in x.tolist()}) == 1024
    ids = x.numpy().astype(np.int32)
    assert graph(ids).tobytes() == (EXAMPLES / "goldens" / f"encoder_{attention}.int8").read_bytes()
    figures = example.evaluate(model, graph, x, y)
    # Measured (see BENCHMARKS.md): every operator within one step of exact (softmax attention
    # two: its 1/256 probability grid), but a trained 8-wide stack amplifies those steps.
    errors = dict(operator_errors(graph, ids))
    assert max(e for name, e in errors.items() if "SOFTMAX_ATTENTION" not in name) <= 1.0
    assert max(errors.values()) <= 2.0
    assert figures["float_worst_lsb"] <= 2 * measured_worst
    assert figures["float_accuracy"] - figures["engine_accuracy"] <= 2 * measured_drop


def test_embedding_and_positional_encoding_export_as_gather_and_add(tmp_path: Path) -> None:
    """EMBEDDING is TFLite's GATHER and ADD_CONSTANT its ADD with a constant tensor: byte-identical
    to LiteRT's reference kernels; layer norm has no builtin and is refused by name."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from test_integer_fc import litert_outputs

    from mixprec.integer import LayerNormNode, export_tflite, load_tflite

    rng = np.random.default_rng(4)
    table_quant, positions_quant = Quantization.per_tensor(0.03, 17), Quantization.per_tensor(0.008, -3)
    table = quantized(rng, (16, 8))
    positions = quantized(rng, (6, 8))
    graph = Graph((TensorSpec("ids", (1, 6), None, "int32"),),
                  (EmbeddingNode((0,), table, table_quant),
                   AddConstantNode((1,), positions, positions_quant, Quantization.per_tensor(0.035, 5))))
    path = tmp_path / "embedding.tflite"
    export_tflite(graph, path)
    ids = rng.integers(0, 16, (1000, 6)).astype(np.int32)
    expected = litert_outputs(path, ids)
    assert np.array_equal(graph(ids), expected)
    reloaded = load_tflite(path)
    assert [node.opcode for node in reloaded.nodes] == ["EMBEDDING", "ADD_CONSTANT"]
    assert np.array_equal(reloaded(ids), expected)
    normed = Graph(graph.inputs, (*graph.nodes, LayerNormNode((2,), np.ones(8, np.float32), np.zeros(8, np.float32),
                                                               1e-5, Quantization.per_tensor(0.02, 0))))
    with pytest.raises(InputError, match="LAYER_NORM has no TFLite builtin operator"):
        export_tflite(normed, tmp_path / "never-written.tflite")
    assert not (tmp_path / "never-written.tflite").exists()


@pytest.mark.parametrize(("attention", "int8_of_range", "int16_of_range", "weights_only_of_range"),
                         [("softmax", 0.0321, 0.0104, 0.0104), ("linear", 0.0510, 0.0141, 0.0142)])
def test_encoder_stack_with_range_margin_and_int16_what_if(encoder_example, attention: str, int8_of_range: float,  # noqa: ANN001
                                                           int16_of_range: float, weights_only_of_range: float) -> None:
    """Measured (BENCHMARKS.md, ``run --range-margin 0.05``): with 5% margins the int8 stack
    stays at 3-5% of range, while int16 activations on the same ranges would fall to the
    floor the int8 weights alone set."""
    from mixprec.integer.graph.simulate import simulate
    from mixprec.integer.models.encoder import build_encoder_graph

    example, load_model = encoder_example
    model = load_model(f"encoder_{attention}", lambda: example.make_model(attention))
    calibration = example.make_set(512, seed=3)[0]
    plain, widened = build_encoder_graph(model, calibration), build_encoder_graph(model, calibration, 0.05)
    assert widened.nodes[1].constant_quant == plain.nodes[1].constant_quant  # the positions are a constant
    assert widened.output_quant.scale32[0] > plain.output_quant.scale32[0]
    x, y = example.held_out_set()
    figures = example.evaluate(model, widened, x, y)
    assert figures["float_worst_of_range"] == pytest.approx(int8_of_range, rel=0.01)
    assert figures["int16_worst_of_range"] == pytest.approx(int16_of_range, rel=0.01)
    reference = example.float64_reference(model, x)
    weights_only = np.abs(simulate(widened, x.numpy().astype(np.int32), rounded=()) - reference).max()
    assert weights_only / figures["range"] == pytest.approx(weights_only_of_range, rel=0.01)


def test_builders_records_and_simulation_refuse_bad_input() -> None:
    from mixprec.integer.build.layers import fully_connected_from, half_linear_from, linear_attention_from
    from mixprec.integer.graph.simulate import operator_errors, simulate
    from mixprec.integer.models.encoder import TinyEncoder, build_encoder_graph
    from mixprec.integer.models.kws import KeywordSpotter, build_pipeline
    from mixprec.integer.ops.attention import LinearAttentionInt8Params, SoftmaxAttentionParams
    from mixprec.integer.ops.layer_norm import LayerNormParams

    q = Quantization.per_tensor(0.1, 0)
    with pytest.raises(InputError, match="takes an nn.Linear, got Conv1d"):
        fully_connected_from(torch.nn.Conv1d(2, 2, 1), 0, q, q)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="takes an nn.Linear, got ReLU"):
        half_linear_from(torch.nn.ReLU(), "float16")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown half format 'fp8'"):
        half_linear_from(torch.nn.Linear(2, 2), "fp8")
    with pytest.raises(InputError, match="must share one half format"):
        from mixprec.integer.half.ops import LinearAttentionParams

        LinearAttentionParams(half_linear_from(torch.nn.Linear(2, 2), "float16"),
                              half_linear_from(torch.nn.Linear(2, 2), "bfloat16"),
                              half_linear_from(torch.nn.Linear(2, 2), "float16"), 1.0)
    with pytest.raises(InputError, match="epsilon must be a positive float16 value"):
        layers = [torch.nn.Linear(2, 2) for _ in range(3)]
        LinearAttentionParams(*(half_linear_from(layer, "float16") for layer in layers), 0.0)
    assert linear_attention_from(*[torch.nn.Linear(2, 2) for _ in range(3)], 0.1, "float16").epsilon == float(
        np.float16(0.1))
    with pytest.raises(InputError, match="build_pipeline takes a KeywordSpotter, got Linear"):
        build_pipeline(torch.nn.Linear(2, 2), torch.zeros(4, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"calibration data must be \[N, steps, 8\], got \(4, 8\)"):
        build_pipeline(KeywordSpotter(), torch.zeros(4, 8))
    with pytest.raises(InputError, match="attention must be one of softmax, linear, got 'cosine'"):
        TinyEncoder(attention="cosine")
    with pytest.raises(InputError, match="calibration must be integer token ids"):
        build_encoder_graph(TinyEncoder(), torch.zeros(4, 8))
    with pytest.raises(InputError, match="build_encoder_graph takes a TinyEncoder"):
        build_encoder_graph(KeywordSpotter(), torch.zeros(4, 8, dtype=torch.long))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="the integer epsilon must be >= 1"):
        LinearAttentionInt8Params(0, 0, 0, 0, 2**30, 0, 0)
    with pytest.raises(InputError, match="exp table must hold 256 non-increasing entries"):
        SoftmaxAttentionParams(0, 0, 0, 2**30, 0, 0, np.zeros(256, np.int32), 2**30, 0, 0)
    one = np.ones(4, np.int32)
    with pytest.raises(InputError, match=r"must all have shape \(4,\)"):
        LayerNormParams(0, 0, one.astype(np.int64), one[:3], one, one, 0)
    with pytest.raises(InputError, match="gamma and beta must be finite vectors"):
        layer_norm_params(np.array([1.0, np.nan]), np.zeros(2), 1e-5, 0.1, 0, 0.1, 0)
    with pytest.raises(InputError, match="needs a per-tensor grid, not 2 per-channel scales"):
        Quantization((0.5, 0.25), (0, 0)).values_of(np.zeros(2, np.int8))
    graph = Graph((TensorSpec("ids", (1, 4), None, "int32"),),
                  (EmbeddingNode((0,), np.zeros((16, 8), np.int8), q),))
    with pytest.raises(InputError, match="simulate takes a mixprec.integer.Graph"):
        simulate("graph", np.zeros((1, 4), np.int32))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="the graph takes 1 inputs, got 2"):
        operator_errors(graph, np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32))


def test_simulation_rounds_only_the_tensors_asked_and_attributes_the_error() -> None:
    from mixprec.integer.build.layers import fully_connected_from
    from mixprec.integer.graph.simulate import onto_grid, rounding_attribution, simulate

    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
    x_quant, h_quant, y_quant = (Quantization.per_tensor(s, z) for s, z in ((0.05, 3), (0.04, -7), (0.03, 2)))
    graph = Graph((TensorSpec("x", (1, 6), x_quant),),
                  (fully_connected_from(first, 0, x_quant, h_quant), fully_connected_from(second, 1, h_quant, y_quant)))
    x = np.random.default_rng(0).integers(-128, 128, (500, 6)).astype(np.int8)
    assert np.array_equal(simulate(graph, x, rounded=(1, 2)), simulate(graph, x))

    def affine(node, in_quant: Quantization) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
        """The node's weights and int32 bias as reals (the bias on the input x weight grid)."""
        scales = node.weight_quant.scale32.astype(np.float64)
        return node.weights * scales[:, None], node.bias * (float(in_quant.scale32[0]) * scales)

    (w1, b1), (w2, b2) = affine(graph.nodes[0], x_quant), affine(graph.nodes[1], h_quant)
    real = x_quant.values_of(x)
    np.testing.assert_allclose(simulate(graph, x, rounded=()), (real @ w1.T + b1) @ w2.T + b2, rtol=1e-13, atol=1e-13)
    assert np.array_equal(simulate(graph, x, rounded=(2,)), onto_grid(simulate(graph, x, rounded=()), y_quant))
    exact = simulate(graph, x, rounded=())
    assert np.array_equal(simulate(graph, x, rounded=(2,), activation_bits=16), onto_grid(exact, y_quant, 16))
    # int16 counterpart of y's grid: symmetric, max(|-128 - 2|, |127 - 2|) * 0.03 / 32767 per step.
    step16 = float(np.float32(130 * np.float32(0.03) / 32767))
    inside = np.abs(exact) <= 32767 * step16
    on16 = onto_grid(exact, y_quant, 16)
    assert np.abs(on16 - exact)[inside].max() <= step16 / 2 * (1 + 1e-9)
    assert np.allclose(on16 / step16, np.round(on16 / step16), rtol=0, atol=1e-6)
    # Both widths clip the same outliers; elsewhere int16 steps are 255/65535-ish of int8 ones.
    assert np.median(np.abs(simulate(graph, x, activation_bits=16) - exact)) < np.median(
        np.abs(simulate(graph, x) - exact)) / 50

    with torch.no_grad():
        reference = second(first(torch.from_numpy(real).float())).double().numpy()
    attribution = rounding_attribution(graph, x, reference=reference)
    assert [name for name, _ in attribution][0] == "weights only"
    assert sorted(name for name, _ in attribution[1:]) == ["0:FULLY_CONNECTED", "1:FULLY_CONNECTED"]
    assert attribution[0][1] < min(error for _, error in attribution[1:])
    with pytest.raises(InputError, match=r"rounded names tensors \[7\] this graph does not have \(0..2\)"):
        simulate(graph, x, rounded=(7,))
    with pytest.raises(InputError, match=r"activation_bits must be one of \(8, 16\), got 12"):
        simulate(graph, x, activation_bits=12)
    with pytest.raises(InputError, match=r"activation bits must be one of \(8, 16\), got 4"):
        onto_grid(exact, y_quant, 4)
    with pytest.raises(InputError, match=r"reference has shape \(500, 2\); the graph's output has \(500, 3\)"):
        rounding_attribution(graph, x, reference=reference[:, :2])



@pytest.mark.parametrize(("attention", "floor_before", "floor_after"), [("softmax", 0.0104, 0.0019),
                                                                        ("linear", 0.0142, 0.0032)])
def test_quantization_aware_fine_tuning_lowers_the_weights_floor(encoder_example, attention: str,  # noqa: ANN001
                                                                 floor_before: float, floor_after: float) -> None:
    """``run --qat-steps 600`` (BENCHMARKS.md): 600 steps with the Linears on their int8 grid
    (mixprec.prepare_qat) and the table on its grid leave weights the builders find on their
    grids again, and the error the weights alone cause falls more than 3x (issue 19's target)."""
    from mixprec.integer.build.layers import symmetric_int8_weights
    from mixprec.integer.graph.simulate import simulate
    from mixprec.integer.models.encoder import build_encoder_graph

    example, load_model = encoder_example
    model = load_model(f"encoder_{attention}", lambda: example.make_model(attention))
    example.fine_tune_on_grid(model, 600)
    for name, linear in model.named_modules():
        if isinstance(linear, torch.nn.Linear):
            weight = linear.weight.detach().numpy().astype(np.float64)
            codes, scales = symmetric_int8_weights(weight)
            assert np.allclose(codes * scales.astype(np.float64)[:, None], weight, rtol=1e-6, atol=0), name
    graph = build_encoder_graph(model, example.make_set(512, seed=3)[0])
    x, _ = example.held_out_set()
    reference = example.float64_reference(model, x)
    floor = np.abs(simulate(graph, x.numpy().astype(np.int32), rounded=()) - reference).max()
    share = floor / float(reference.max() - reference.min())
    assert share == pytest.approx(floor_after, rel=0.05)
    assert share <= floor_before / 3
