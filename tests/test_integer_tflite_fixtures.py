"""Models made by TensorFlow's converter (tests/fixtures, made by tools/make_tflite_fixtures.py),
int8 and 16x8: read by mixprec's integer engine and byte-identical to LiteRT's reference kernels."""

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
    # CONCATENATION twice; RESHAPE from folded shape arithmetic, from a constant (-1, 9, 4), and EXPAND_DIMS
    ("concat_reshape_int8", ["CONV_2D", "CONV_2D", "CONCATENATION", "CONV_2D", "RESHAPE", "RESHAPE", "RESHAPE",
                             "RESHAPE", "FULLY_CONNECTED", "FULLY_CONNECTED", "CONCATENATION"]),
    # a fixed batch of 1: the RESHAPE's constant target (1, 36) includes the batch
    ("concat_reshape_static_batch_int8", ["CONV_2D", "CONV_2D", "CONCATENATION", "CONV_2D", "RESHAPE",
                                          "FULLY_CONNECTED", "FULLY_CONNECTED", "CONCATENATION"]),
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
    static_batch = "static_batch" in name  # LiteRT runs such a file one sample at a time
    expected = _one_at_a_time(path, inputs) if static_batch else litert_outputs(path, inputs)
    assert np.array_equal(graph(inputs), expected)


def _one_at_a_time(path: Path, inputs: np.ndarray) -> np.ndarray:
    """LiteRT BUILTIN_REF on each input alone (a file whose shapes fix the batch at 1)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    source, result = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    outputs = []
    for sample in inputs:
        interpreter.set_tensor(source, sample[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(result)[0].copy())
    return np.stack(outputs)


def _int16_inputs(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """1,000 inputs: half drawn over the whole int16 range, half like the calibration data
    (standard normal values on the input grid), the extremes first."""
    wide = rng.integers(-32768, 32768, (500, *shape))
    typical = np.clip(np.round(rng.normal(0, 1, (500, *shape)) / scale), -32768, 32767)
    inputs = np.concatenate([wide, typical]).astype(np.int16)
    inputs[0], inputs[1] = -32768, 32767
    return inputs


@pytest.mark.parametrize("name, operators", [
    ("ds_cnn_16x8", ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "AVERAGE_POOL_2D",
                     "RESHAPE", "FULLY_CONNECTED"]),
    ("pooled_cnn_16x8_float_io", ["QUANTIZE", "CONV_2D", "PAD", "MAX_POOL_2D", "DEPTHWISE_CONV_2D",
                                  "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "FULLY_CONNECTED", "DEQUANTIZE"]),
    # MEAN and the 16x8 SOFTMAX (interpolated exp and reciprocal tables)
    ("ds_cnn_softmax_16x8", ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "MEAN",
                             "FULLY_CONNECTED", "SOFTMAX"]),
    # the 16x8 ADD (general scales) and MEAN
    ("residual_cnn_16x8", ["CONV_2D", "MAX_POOL_2D", "CONV_2D", "ADD", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
                           "MEAN", "FULLY_CONNECTED"]),
    # in 16x8 the converter requantizes one input of each CONCATENATION (int16 -> int16 QUANTIZE)
    ("concat_reshape_16x8", ["CONV_2D", "CONV_2D", "QUANTIZE", "CONCATENATION", "CONV_2D", "RESHAPE", "RESHAPE",
                             "RESHAPE", "RESHAPE", "FULLY_CONNECTED", "FULLY_CONNECTED", "QUANTIZE", "CONCATENATION"]),
])
def test_tensorflow_converted_16x8_cnns_are_byte_identical_to_litert(name: str, operators: list[str]) -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    path = FIXTURES / f"{name}.tflite"
    graph = load_tflite(path)
    assert [node.opcode for node in graph.nodes] == operators
    assert "int16" in graph.tensor_dtypes
    assert all(node.bias is None or node.bias.dtype == np.int64 for node in graph.nodes if hasattr(node, "bias"))
    spec = graph.inputs[0]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if spec.dtype == "int16":
        inputs = _int16_inputs(rng, spec.shape[1:], spec.quant.scale[0])
    else:  # float32 in: normal values, some far beyond the calibrated range (the QUANTIZE saturates)
        inputs = rng.normal(0, 1, (1000, *spec.shape[1:])).astype(np.float32)
        inputs[:100] *= 50
    expected = litert_outputs(path, inputs)
    assert expected.dtype == graph(inputs[:1]).dtype
    assert np.array_equal(graph(inputs), expected)
