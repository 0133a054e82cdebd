"""Make the TensorFlow-converted int8 and 16x8 CNN fixtures of tests/fixtures/ (issue 16).

Run in a side environment that has TensorFlow (it is not a dependency of mixprec):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfenv/bin/python tools/make_tflite_fixtures.py tests/fixtures

Each model is a small Keras network with random weights, random biases and random BatchNorm
statistics, converted by ``tf.lite.TFLiteConverter`` with full-integer quantization (a
representative dataset of 200 seeded random inputs), as users convert models for
microcontrollers: int8 (int8 inputs and outputs), or TFLite's 16x8 mode
(``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``: int16 activations, int8
weights, int64 biases; int16 or float32 inputs and outputs). The converter folds BatchNorm
and ReLU into the convolutions and writes GlobalAveragePooling as MEAN.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers


def _randomize_batchnorms(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.uniform(-0.5, 0.5, beta.shape),
                               rng.uniform(-0.5, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])


def _randomize_dense_biases(model: keras.Model, rng: np.random.Generator) -> None:
    """Keras starts Dense biases at zero, which the converter drops; give them values."""
    for layer in model.layers:
        if isinstance(layer, layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.uniform(-0.5, 0.5, bias.shape)])


def _ds_cnn_features(inputs: keras.KerasTensor, width: int, blocks: int) -> keras.KerasTensor:
    """The MLPerf Tiny DS-CNN shape, narrowed: 10x4 stride-2 conv, depthwise-separable blocks."""
    x = layers.Conv2D(width, (10, 4), strides=2, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for _ in range(blocks):
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.Conv2D(width, 1, use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    return x


def ds_cnn(width: int = 16, blocks: int = 2) -> keras.Model:
    """DS-CNN with global average pooling (MEAN), Dense and Softmax."""
    inputs = keras.Input((49, 10, 1))
    x = layers.GlobalAveragePooling2D()(_ds_cnn_features(inputs, width, blocks))
    return keras.Model(inputs, layers.Softmax()(layers.Dense(10)(x)))


def residual_cnn(width: int = 8) -> keras.Model:
    """A small ResNet-style network: a stride-2 convolution, max and average pooling with SAME
    padding, a residual ADD, a depthwise layer with depth multiplier 2, VALID padding, ReLU6.
    (No dilation: the converter writes a dilated convolution as SPACE_TO_BATCH_ND / CONV_2D /
    BATCH_TO_SPACE_ND.)"""
    inputs = keras.Input((20, 20, 3))
    x = layers.Conv2D(width, 3, strides=2, padding="same")(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.MaxPooling2D(3, strides=1, padding="same")(x)
    y = layers.Conv2D(width, 3, padding="same")(x)
    y = layers.BatchNormalization()(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid")(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = layers.AveragePooling2D(3, strides=2, padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(5)(x))


def flatten_residual(width: int = 16) -> keras.Model:
    """A convolution, Flatten, and a residual MLP through Reshape / Flatten: the converter writes
    each dynamic-batch reshape as SHAPE -> STRIDED_SLICE -> PACK -> RESHAPE."""
    inputs = keras.Input((6, 6, 2))
    x = layers.Flatten()(layers.Conv2D(4, 3, padding="same", activation="relu")(inputs))
    y = layers.Dense(width, activation="relu")(x)
    z = layers.Flatten()(layers.Reshape((4, width // 4))(y))
    return keras.Model(inputs, layers.Dense(3)(layers.Add()([y, z])))


def ds_cnn_pooled(width: int = 16, blocks: int = 2) -> keras.Model:
    """DS-CNN ending in a whole-map AVERAGE_POOL_2D, Flatten and Dense (logits): the operators
    the engine runs in 16x8."""
    inputs = keras.Input((49, 10, 1))
    x = layers.Flatten()(layers.AveragePooling2D((25, 5))(_ds_cnn_features(inputs, width, blocks)))
    return keras.Model(inputs, layers.Dense(10)(x))


def pooled_cnn(width: int = 8) -> keras.Model:
    """Stride-2 convolution, ZeroPadding (PAD), max pooling with SAME padding, a depthwise layer
    with depth multiplier 2 and VALID padding, ReLU6, average pooling, Flatten, Dense with ReLU."""
    inputs = keras.Input((20, 20, 3))
    x = layers.Conv2D(width, 3, strides=2, padding="same")(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.ZeroPadding2D(((1, 0), (2, 1)))(x)
    x = layers.MaxPooling2D(3, strides=1, padding="same")(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid")(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = layers.AveragePooling2D(3, strides=2, padding="same")(x)
    x = layers.Dense(6, activation="relu")(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(4)(x))


def concat_reshape(batch: int | None = None) -> keras.Model:
    """Two convolution branches joined by Concatenate (CONCATENATION on channels), Reshape,
    expand_dims / squeeze, two Dense heads joined again: with a free batch the converter writes
    EXPAND_DIMS and RESHAPEs with targets from folded shape arithmetic and from constants that
    start with -1; with ``batch=1`` a constant target that includes the batch."""
    inputs = keras.Input((8, 8, 2), batch_size=batch)
    a = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = layers.Conv2D(3, 1, padding="same")(inputs)
    x = layers.Conv2D(4, 3, strides=2, padding="valid")(layers.Concatenate()([a, b]))
    x = layers.Reshape((9, 4))(x)
    x = layers.Lambda(lambda t: keras.ops.expand_dims(t, 1))(x)
    x = layers.Flatten()(layers.Lambda(lambda t: keras.ops.squeeze(t, 1))(x))
    return keras.Model(inputs, layers.Concatenate()([layers.Dense(5)(x), layers.Dense(3)(x)]))


def convert_16x8(model: keras.Model, rng: np.random.Generator, integer_io: bool) -> bytes:
    """16x8 full-integer conversion; int16 inputs and outputs, or float32 ones (the converter
    then writes QUANTIZE float32 -> int16 first and DEQUANTIZE last)."""
    converter = _converter(model, rng)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    if integer_io:
        converter.inference_input_type = tf.int16
        converter.inference_output_type = tf.int16
    return converter.convert()


def _converter(model: keras.Model, rng: np.random.Generator) -> tf.lite.TFLiteConverter:
    shape = model.input_shape[1:]

    def representative():
        for _ in range(200):
            yield [rng.normal(0, 1, (1, *shape)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    return converter


def convert(model: keras.Model, rng: np.random.Generator) -> bytes:
    """int8 full-integer conversion with int8 inputs and outputs."""
    converter = _converter(model, rng)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in (("ds_cnn_int8", ds_cnn), ("residual_cnn_int8", residual_cnn),
                        ("flatten_residual_int8", flatten_residual), ("ds_cnn_16x8", ds_cnn_pooled),
                        ("pooled_cnn_16x8_float_io", pooled_cnn), ("concat_reshape_int8", concat_reshape),
                        ("concat_reshape_static_batch_int8", lambda: concat_reshape(batch=1)),
                        ("concat_reshape_16x8", concat_reshape), ("residual_cnn_16x8", residual_cnn),
                        ("ds_cnn_softmax_16x8", ds_cnn)):
        rng = np.random.default_rng(0)
        tf.keras.utils.set_random_seed(0)
        model = build()
        _randomize_batchnorms(model, rng)
        if name.startswith("concat") or not name.endswith("_int8"):  # (the first int8 fixtures kept zero biases)
            _randomize_dense_biases(model, rng)
        if name.endswith("_int8"):
            data = convert(model, rng)
        else:
            data = convert_16x8(model, rng, integer_io=not name.endswith("float_io"))
        (out / f"{name}.tflite").write_bytes(data)
        print(f"wrote {out / name}.tflite ({len(data)} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
