"""Models made by TensorFlow's converter (tests/fixtures, made by tools/make_tflite_fixtures.py):
read by mixprec's integer engine and byte-identical to LiteRT's reference kernels."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from test_integer_fc import litert_outputs

from mixprec.integer import load_tflite

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("name, operators", [
    ("ds_cnn_int8", ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "MEAN",
                     "FULLY_CONNECTED", "SOFTMAX"]),
    ("residual_cnn_int8", ["CONV_2D", "MAX_POOL_2D", "CONV_2D", "ADD", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
                           "MEAN", "FULLY_CONNECTED"]),
    # each Flatten / Reshape arrives as SHAPE -> STRIDED_SLICE -> PACK -> RESHAPE, folded at import
    ("flatten_residual_int8", ["CONV_2D", "RESHAPE", "FULLY_CONNECTED", "RESHAPE", "RESHAPE", "ADD",
                               "FULLY_CONNECTED"]),
])
def test_tensorflow_converted_cnns_are_byte_identical_to_litert(name: str, operators: list[str]) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    path = FIXTURES / f"{name}.tflite"
    graph = load_tflite(path)
    assert [node.opcode for node in graph.nodes] == operators
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    inputs = rng.integers(-128, 128, (1000, *graph.inputs[0].shape[1:])).astype(np.int8)
    inputs[0], inputs[1] = -128, 127
    assert np.array_equal(graph(inputs), litert_outputs(path, inputs))
