"""The encoder's own operators in 16x8 (int16 activations, zero points 0): layer norm, the two
attentions, the embedding; the encoder stacks built in 16x8 against their bounds and goldens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mixprec import InputError
from mixprec.integer import Graph, Quantization, TensorSpec
from mixprec.integer.graph.nodes import EmbeddingNode, LayerNormNode
from mixprec.integer.ops.attention import (
    MAX_INT16_LINEAR_SPAN,
    int16_attention_params,
    linear_attention16,
    softmax_attention16,
)
from mixprec.integer.ops.layer_norm import layer_norm, layer_norm_params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def int16_codes(rng: np.random.Generator, shape: tuple[int, ...], peak: int = 32767) -> np.ndarray:
    return rng.integers(-peak, peak + 1, shape).astype(np.int16)


def test_int16_layer_norm_is_within_one_step_of_float() -> None:
    rng = np.random.default_rng(1)
    for width, s_in, s_out in ((8, 1e-3, 1e-4), (64, 3e-4, 2e-4), (1024, 1e-2, 1.5e-4)):
        gamma, beta = rng.uniform(-2, 2, width), rng.uniform(-1, 1, width)
        params = layer_norm_params(gamma, beta, 1e-5, s_in, 0, s_out, 0)
        # rows of every spread: full-range codes (the variance near int64's end), and quiet ones
        x = int16_codes(rng, (4000, width)) // rng.integers(1, 4000, (4000, 1)).astype(np.int16)
        x[0] = 7  # a constant row: zero variance gives beta
        got = layer_norm(x, params)
        assert got.dtype == np.int16
        x_real = x.astype(np.float64) * np.float32(s_in)
        reference = torch.nn.functional.layer_norm(torch.from_numpy(x_real), (width,), torch.from_numpy(gamma),
                                                   torch.from_numpy(beta), 1e-5).numpy()
        ideal = np.clip(reference / np.float32(s_out), -32768, 32767)
        # final rounding (1/2 step), beta's rounding (1/2 step), the rescale's first rounding (up
        # to 1/4 step for these multipliers) and the reciprocal square root's 16 or more bits:
        # measured worst 0.93, 1.14, 1.26 steps for widths 8, 64, 1024
        assert np.abs(got - ideal).max() <= 1.3
        assert np.array_equal(got[0], np.clip(np.round(beta / np.float32(s_out)), -32768, 32767))


def test_int16_layer_norm_refuses_what_int64_cannot_hold() -> None:
    params = layer_norm_params(np.ones(2048), np.zeros(2048), 1e-5, 1e-3, 0, 1e-3, 0)
    with pytest.raises(InputError, match="at most 1024 channels"):
        layer_norm(np.zeros((1, 2048), np.int16), params)
    shifted = layer_norm_params(np.ones(8), np.zeros(8), 1e-5, 1e-3, 3, 1e-3, 0)
    with pytest.raises(InputError, match="zero points 0"):
        layer_norm(np.zeros((1, 8), np.int16), shifted)
    with pytest.raises(InputError, match=r"epsilon must lie in \[0, 2\^61\)"):
        layer_norm_params(np.ones(8), np.zeros(8), 1.0, 1e-12, 0, 1e-3, 0)
    with pytest.raises(InputError, match="int8 or int16 numpy array"):
        layer_norm(np.zeros((1, 8), np.int32), shifted)


def test_int16_softmax_attention_matches_its_float_definition() -> None:
    rng = np.random.default_rng(2)
    s_q, s_k, s_v, s_score, s_out = 2e-4, 2.5e-4, 3e-4, 1e-3, 2e-4
    params = int16_attention_params(8, s_q, s_k, s_v, s_out, score=s_score)
    q, k, v = (int16_codes(rng, (2000, 8, 8)) for _ in range(3))
    got = softmax_attention16(q, k, v, params)
    Q, K, V = (c.astype(np.float64) * np.float32(s) for c, s in ((q, s_q), (k, s_k), (v, s_v)))
    scores = np.clip(np.round(Q @ np.swapaxes(K, -1, -2) / math.sqrt(8) / np.float32(s_score)), -32768, 32767)
    probabilities = np.exp((scores - scores.max(-1, keepdims=True)) * np.float32(s_score))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    ideal = np.clip(probabilities @ V / np.float32(s_out), -32768, 32767)
    # LiteRT's int16 SOFTMAX (interpolated exp and reciprocal tables, probabilities below
    # exp(-10) dropped) is good to a few units of 1/32768 per probability; eight of them times
    # values spanning the int16 range: measured worst 29.5 output steps of 65,536 (0.045%)
    assert np.abs(got - ideal).max() <= 32


def test_int16_linear_attention_matches_its_float_definition_and_refuses_long_sums() -> None:
    rng = np.random.default_rng(3)
    s_q, s_k, s_v, s_out = 5e-4, 4e-4, 3e-4, 2e-4
    params = int16_attention_params(8, s_q, s_k, s_v, s_out, epsilon=1.0)
    q, k, v = int16_codes(rng, (2000, 8, 8)), int16_codes(rng, (2000, 8, 8)), int16_codes(rng, (2000, 8, 8))
    got = linear_attention16(q, k, v, params)
    Q, K = (np.maximum(c, 0).astype(np.float64) * np.float32(s) for c, s in ((q, s_q), (k, s_k)))
    V = v.astype(np.float64) * np.float32(s_v)
    den = (Q * K.sum(axis=-2, keepdims=True)).sum(axis=-1, keepdims=True) + 1.0
    ideal = np.clip((Q @ (np.swapaxes(K, -1, -2) @ V)) / den / np.float32(s_out), -32768, 32767)
    # the ratio rounded onto v's grid (1/2 of v's step = 0.75 output steps here), then the
    # output rounding: measured worst 1.25 steps
    assert np.abs(got - ideal).max() <= 1.3
    long = np.zeros((1, 2048, 64), np.int16)
    assert 2048 * 64 >= MAX_INT16_LINEAR_SPAN
    with pytest.raises(InputError, match="S \\* P < 131072"):
        linear_attention16(long, long, long, params)
    with pytest.raises(InputError, match="an int16 numpy array"):
        linear_attention16(q.astype(np.int8), k, v, params)
    with pytest.raises(InputError, match="exactly one"):
        int16_attention_params(8, s_q, s_k, s_v, s_out)


def test_int16_embedding_and_layer_norm_nodes_check_their_grids() -> None:
    table = np.arange(-800, 800, 10, dtype=np.int16).reshape(16, 10)
    graph = Graph((TensorSpec("ids", (1, 3), None, "int32"),),
                  (EmbeddingNode((0,), table, Quantization.per_tensor(0.01, 0)),
                   LayerNormNode((1,), np.ones(10, np.float32), np.zeros(10, np.float32), 1e-5,
                                 Quantization.per_tensor(1e-4, 0))))
    assert graph.tensor_dtypes == ("int32", "int16", "int16")
    assert graph(np.array([[0, 15, 3]], np.int32)).dtype == np.int16
    with pytest.raises(InputError, match="int16 zero point must be 0"):
        EmbeddingNode((0,), table, Quantization.per_tensor(0.01, 4))
    with pytest.raises(InputError, match="LAYER_NORM output: an int16 zero point must be 0"):
        Graph(graph.inputs, (graph.nodes[0], LayerNormNode((1,), np.ones(10, np.float32), np.zeros(10, np.float32),
                                                           1e-5, Quantization.per_tensor(1e-4, 3))))


@pytest.fixture(scope="module")
def encoder_example(import_example):  # noqa: ANN001, ANN201
    return import_example("encoder_stacks"), import_example("example_modes").load_model


@pytest.mark.parametrize(("attention", "measured_of_range", "measured_engine_steps"),
                         [("softmax", 0.007464, 11.0), ("linear", 0.008891, 14.0)])
def test_encoder_stack_in_16x8_meets_its_bound(encoder_example, attention: str, measured_of_range: float,  # noqa: ANN001
                                               measured_engine_steps: float) -> None:
    """Measured (BENCHMARKS.md, ``run --activations int16 --range-margin 0.05``): every tensor
    int16; the worst error against float32 is what the int8 weights alone leave (targets:
    1% softmax, 1.5% linear)."""
    from mixprec.integer.graph.simulate import operator_errors
    from mixprec.integer.models.encoder import build_encoder_graph

    example, load_model = encoder_example
    model = load_model(f"encoder_{attention}", lambda: example.make_model(attention))
    calibration = example.make_set(512, seed=3)[0]
    x, y = example.held_out_set()
    ids = x.numpy().astype(np.int32)
    golden = build_encoder_graph(model, calibration, activations="int16")
    assert golden(ids).tobytes() == (EXAMPLES / "goldens" / f"encoder_{attention}.int16").read_bytes()
    graph = build_encoder_graph(model, calibration, 0.05, activations="int16")
    assert set(graph.tensor_dtypes[1:]) == {"int16"}
    figures = example.evaluate(model, graph, x, y)
    assert figures["float_worst_of_range"] == pytest.approx(measured_of_range, rel=0.01)
    assert figures["float_worst_of_range"] <= example.MAX_OF_RANGE[attention]
    assert figures["engine_worst_lsb"] <= measured_engine_steps  # of 65,536 steps across the output grid
    errors = dict(operator_errors(graph, ids))
    assert max(e for name, e in errors.items() if "SOFTMAX_ATTENTION" not in name) <= 1.0
    assert max(errors.values()) <= 5.0  # measured 5: LiteRT's int16 SOFTMAX tables inside the attention
    with pytest.raises(InputError, match="activations must be 'int8' or 'int16'"):
        build_encoder_graph(model, calibration, activations="int4")


@pytest.mark.parametrize(("attention", "int8_mean", "mix_mean"), [("softmax", 0.003764, 0.003227),
                                                                  ("linear", 0.004282, 0.003663)])
def test_encoder_stages_take_their_own_types_and_the_search_mixes_them(encoder_example, attention: str,  # noqa: ANN001
                                                                       int8_mean: float, mix_mean: float) -> None:
    """One activation type per stage: a QUANTIZE wherever an operator reads the other type, the
    uniform mappings giving the uniform graphs' bytes; the searched mix (budget 1.3x the int8
    arena) lowers the held-out mean error below int8's (measured, BENCHMARKS.md)."""
    from mixprec.integer.build.mix import arena_bytes
    from mixprec.integer.graph.simulate import operator_errors
    from mixprec.integer.models.encoder import build_encoder_graph, encoder_stages

    example, load_model = encoder_example
    model = load_model(f"encoder_{attention}", lambda: example.make_model(attention))
    calibration = example.make_set(512, seed=3)[0]
    x, y = example.held_out_set()
    ids = x.numpy().astype(np.int32)
    for kind in ("int8", "int16"):
        uniform = build_encoder_graph(model, calibration, activations=dict.fromkeys(encoder_stages(model), kind))
        assert uniform(ids).tobytes() == build_encoder_graph(model, calibration, activations=kind)(ids).tobytes()
    mixed = build_encoder_graph(model, calibration, 0.05, {"block0.residual1": "int16", "logits": "int16"})
    opcodes = [node.opcode for node in mixed.nodes]
    # residual1 reads two int8 tensors (2 QUANTIZE up), its two int8 readers share one QUANTIZE down;
    # the int16 head reads an int8 tensor (1 up)
    assert opcodes.count("QUANTIZE") == 4 and mixed.tensor_dtypes.count("int16") == 5
    assert mixed.tensor_dtypes[-1] == "int16"
    assert max(error for _, error in operator_errors(mixed, ids)) <= 2.0  # measured 2.0 (softmax), 1.0 (linear)
    choice = example.searched_graph(model, calibration, 0.05, 1.3)
    assert choice.wide and choice.arena <= 1.3 * choice.int8_arena == 1.3 * arena_bytes(
        build_encoder_graph(model, calibration, 0.05))
    figures = example.evaluate(model, choice.graph, x, y)
    assert figures["float_mean_of_range"] == pytest.approx(mix_mean, rel=0.01)
    assert figures["float_mean_of_range"] < int8_mean == pytest.approx(
        example.evaluate(model, build_encoder_graph(model, calibration, 0.05), x, y)["float_mean_of_range"], rel=0.01)
    with pytest.raises(InputError, match=r"unknown stages \['block9.up'\]"):
        build_encoder_graph(model, calibration, activations={"block9.up": "int16"})
    with pytest.raises(InputError, match="types other than int8 / int16"):
        build_encoder_graph(model, calibration, activations={"logits": "int4"})
    with pytest.raises(InputError, match="encoder_stages takes a TinyEncoder"):
        encoder_stages(torch.nn.Linear(2, 2))
