"""Make the TensorFlow-converted int8 CNN fixtures of tests/fixtures/ (issue 16).

Run in a side environment that has TensorFlow (it is not a dependency of mixprec):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfenv/bin/python tools/make_tflite_fixtures.py tests/fixtures

Each model is a small Keras network with random weights and random BatchNorm statistics,
converted by ``tf.lite.TFLiteConverter`` with full-integer quantization (int8 inputs and
outputs, a representative dataset of 200 seeded random inputs), as users convert models for
microcontrollers. The converter folds BatchNorm and ReLU into the convolutions and writes
GlobalAveragePooling as MEAN.
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


def ds_cnn(width: int = 16, blocks: int = 2) -> keras.Model:
    """The MLPerf Tiny DS-CNN shape, narrowed: 10x4 stride-2 conv, depthwise-separable blocks."""
    inputs = keras.Input((49, 10, 1))
    x = layers.Conv2D(width, (10, 4), strides=2, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for _ in range(blocks):
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.Conv2D(width, 1, use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
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


def convert(model: keras.Model, rng: np.random.Generator) -> bytes:
    shape = model.input_shape[1:]

    def representative():
        for _ in range(200):
            yield [rng.normal(0, 1, (1, *shape)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in (("ds_cnn_int8", ds_cnn), ("residual_cnn_int8", residual_cnn),
                        ("flatten_residual_int8", flatten_residual)):
        rng = np.random.default_rng(0)
        tf.keras.utils.set_random_seed(0)
        model = build()
        _randomize_batchnorms(model, rng)
        data = convert(model, rng)
        (out / f"{name}.tflite").write_bytes(data)
        print(f"wrote {out / name}.tflite ({len(data)} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
