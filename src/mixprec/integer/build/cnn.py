"""Float PyTorch CNN layers plus calibration data -> an int8, 16x8 or mixed integer :class:`Graph` (NHWC).

:func:`cnn_graph_from` takes a plain chain of layers, as a ``nn.Sequential`` lists them:

- ``nn.Conv2d`` (BatchNorm folded first: :func:`mixprec.fold_batchnorm`; ``groups`` 1, or
  depthwise with ``groups == in_channels``), followed optionally by ``nn.ReLU`` or ``nn.ReLU6``,
  which become the operator's fused activation. Padding that TFLite's SAME reproduces (the same
  output size and padding before) is written SAME, none is VALID, any other is an explicit PAD
  with the zero point followed by a VALID convolution;
- ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with padding 0 (VALID) and, for the average,
  ``count_include_pad`` irrelevant then;
- ``nn.AdaptiveAvgPool2d(1)`` followed by ``nn.Flatten()``: MEAN over height and width in
  int8; in int16 (LiteRT's MEAN has no 16x8 form here) an AVERAGE_POOL_2D over the whole map
  and a RESHAPE, as TensorFlow's converter writes a whole-map average pool;
- ``nn.Linear``: FULLY_CONNECTED (on a flat ``[N, features]`` tensor);
- ``nn.Identity`` (a folded BatchNorm) is skipped.

Weights are symmetric int8 per output channel (``scale = float32(max|w| / 127)``, codes
rounded half to even), biases int32 on the ``float32(s_in * s_w)`` grid, as the TFLite
converter writes them; every activation tensor gets :func:`~mixprec.integer.build.layers.calibrate`'s
asymmetric int8 quantization of its values on the calibration batch (after the fused ReLU).

``activations`` chooses each operator's activation type: ``"int8"``, ``"int16"`` (TFLite's
16x8 mode: symmetric int16 tensors from
:func:`~mixprec.integer.build.layers.calibrate_int16`, int64 biases), or one name per entry
of ``layers`` (entries that fuse into the layer before them, ReLU and Flatten, and Identity
are not read). Where consecutive operators differ, a QUANTIZE onto the next operator's type
joins them; the graph's input takes the first operator's type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.build.layers import bias_codes, calibrate_as, fully_connected_from, symmetric_int8_weights
from mixprec.integer.core.tensors import Quantization, TensorSpec
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import (
    AveragePool2DNode,
    Conv2DNode,
    DepthwiseConv2DNode,
    MaxPool2DNode,
    MeanNode,
    PadNode,
    QuantizeNode,
    ReshapeNode,
)
from mixprec.integer.ops.conv import output_size

_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _tflite_padding(shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
                    dilation: tuple[int, int], padding: tuple[int, int]) -> str | None:
    """``"VALID"`` or ``"SAME"`` when TFLite's padding equals PyTorch's symmetric ``padding`` here, else None."""
    if padding == (0, 0):
        return "VALID"
    for axis in (0, 1):
        size = shape[1 + axis]
        torch_out = (size + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1) - 1) // stride[axis] + 1
        same_out, same_before = output_size(size, kernel[axis], stride[axis], dilation[axis], "SAME")
        if (torch_out, padding[axis]) != (same_out, same_before):
            return None
    return "SAME"


def _conv_weights(conv: nn.Conv2d) -> tuple[np.ndarray, np.ndarray, Quantization, bool]:
    """NHWC-layout codes, per-output-channel float32 scales, their Quantization, and whether depthwise."""
    depthwise = conv.groups == conv.in_channels and conv.groups > 1
    if conv.groups != 1 and not depthwise:
        raise InputError(f"a convolution with groups={conv.groups} is neither plain (1) nor depthwise "
                         f"({conv.in_channels}); TFLite has no grouped convolution")
    codes, scales = symmetric_int8_weights(conv.weight.detach().to(torch.float64).numpy())  # [out, in/g, kh, kw]
    codes = codes.transpose(1, 2, 3, 0) if depthwise else codes.transpose(0, 2, 3, 1)  # [1,kh,kw,out] / [out,kh,kw,in]
    quant = Quantization(tuple(float(s) for s in scales), (0,) * len(scales), 3 if depthwise else 0)
    return codes, scales, quant, depthwise


def _activation_types(layers: Sequence[nn.Module], activations: str | Sequence[str]) -> list[str]:
    types = [activations] * len(layers) if isinstance(activations, str) else list(activations)
    if len(types) != len(layers) or any(kind not in ("int8", "int16") for kind in types):
        raise InputError(f"activations must be 'int8', 'int16' or one of them per layer ({len(layers)}), got "
                         f"{activations!r}")
    return types


def cnn_graph_from(layers: Sequence[nn.Module], calibration: torch.Tensor, per_channel: bool = True,
                   margin: float = 0.0, activations: str | Sequence[str] = "int8") -> Graph:
    """The integer graph of a chain of float layers (see module docstring).

    ``calibration``: float NCHW inputs (a batch); the graph's input is their NHWC image on the
    first operator's grid (int8 or int16), and takes NHWC arrays of any batch size.
    """
    types = _activation_types(layers, activations)
    kept = [(layer, kind) for layer, kind in zip(layers, types) if not isinstance(layer, nn.Identity)]
    layers, types = [layer for layer, _ in kept], [kind for _, kind in kept]
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 4 or not calibration.is_floating_point():
        raise InputError("calibration must be a float NCHW tensor (a batch of the model's inputs)")
    if not per_channel:
        raise InputError("cnn_graph_from writes per-channel weights (as the TFLite converter does)")
    x = calibration.detach().to(torch.float32)
    current = types[0] if types else "int8"
    quant = calibrate_as(current, x, margin)
    spec = TensorSpec("input", (1, x.shape[2], x.shape[3], x.shape[1]), quant, current)
    nodes: list = []
    tensor, index = 0, 0
    with torch.no_grad():
        while index < len(layers):
            layer, kind = layers[index], types[index]
            follower = layers[index + 1] if index + 1 < len(layers) else None
            activation = _ACTIVATIONS.get(type(follower), "none")
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                raise InputError("fold the BatchNorms first (mixprec.fold_batchnorm); TFLite has no int8 BatchNorm")
            if kind != current:  # join the two types with a QUANTIZE onto the next operator's grid
                quant = calibrate_as(kind, x, margin)
                nodes.append(QuantizeNode((tensor,), quant, kind))
                tensor, current = tensor + 1, kind
            if isinstance(layer, nn.Conv2d):
                x, added = conv_nodes(layer, x, quant, tensor, activation, follower, margin, kind)
                index += 2 if activation != "none" else 1
            elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
                x, added = pool_nodes(layer, x, tensor, activation, follower)
                index += 2 if activation != "none" else 1
            elif isinstance(layer, nn.AdaptiveAvgPool2d) and isinstance(follower, nn.Flatten):
                if _pair(layer.output_size) != (1, 1):
                    raise InputError("AdaptiveAvgPool2d must pool to 1x1 (a global mean) before Flatten")
                x, added = global_mean_nodes(x, tensor, kind, margin)
                index += 2
            elif isinstance(layer, nn.Linear):
                if x.dim() != 2:
                    raise InputError(f"nn.Linear needs a flat [N, features] input here, got shape {tuple(x.shape)}")
                x = layer(x)
                if activation != "none":
                    x = follower(x)
                    index += 1
                added = [fully_connected_from(layer, tensor, quant, calibrate_as(kind, x, margin), activation,
                                              activations=kind)]
                index += 1
            else:
                raise InputError(f"cnn_graph_from does not convert {type(layer).__name__} (layer {index}); it takes "
                                 "Conv2d, ReLU/ReLU6, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1) + Flatten, Linear")
            nodes += added
            tensor += len(added)
            quant = added[-1].output_quant if hasattr(added[-1], "output_quant") else quant
    return Graph((spec,), tuple(nodes))


def conv_nodes(conv: nn.Conv2d, x: torch.Tensor, input_quant: Quantization, tensor: int, activation: str,
               follower: Callable[[torch.Tensor], torch.Tensor] | None, margin: float,
               kind: str) -> tuple[torch.Tensor, list]:
    """The float output of ``conv`` on ``x`` (NCHW; then ``follower``, the fused ``activation``,
    unless it is ``"none"``) and its nodes reading graph tensor ``tensor`` (on ``input_quant``):
    CONV_2D or DEPTHWISE_CONV_2D, after a PAD where TFLite's SAME does not reproduce the padding."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise InputError("convert convolutions with explicit zero padding (padding=(p_h, p_w), padding_mode='zeros')")
    kernel, stride, dilation, padding = (_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation),
                                         _pair(conv.padding))
    shape = (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    y = conv(x)
    if activation != "none":
        y = follower(y)
    codes, scales, weight_quant, depthwise = _conv_weights(conv)
    node_class = DepthwiseConv2DNode if depthwise else Conv2DNode
    output_quant = calibrate_as(kind, y, margin)
    bias = bias_codes(conv.bias, input_quant, scales, kind)
    tflite_padding = _tflite_padding(shape, kernel, stride, dilation, padding)
    if tflite_padding is not None:
        return y, [node_class((tensor,), codes, weight_quant, bias, output_quant, tflite_padding, stride, dilation,
                              activation)]
    pad = PadNode((tensor,), ((0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0)))
    return y, [pad, node_class((tensor + 1,), codes, weight_quant, bias, output_quant, "VALID", stride, dilation,
                               activation)]


def pool_nodes(layer: nn.Module, x: torch.Tensor, tensor: int, activation: str,
               follower: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, list]:
    """The float output of a VALID ``nn.MaxPool2d`` / ``nn.AvgPool2d`` on ``x`` (then ``follower``)
    and its pooling node reading graph tensor ``tensor``."""
    kernel, stride, padding = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size), _pair(layer.padding)
    if padding != (0, 0) or getattr(layer, "ceil_mode", False) or _pair(getattr(layer, "dilation", 1)) != (1, 1):
        raise InputError(f"convert {type(layer).__name__} with padding 0, ceil_mode False and dilation 1 (VALID)")
    y = layer(x)
    if activation != "none":
        y = follower(y)
    node_class = MaxPool2DNode if isinstance(layer, nn.MaxPool2d) else AveragePool2DNode
    return y, [node_class((tensor,), kernel, stride, "VALID", activation)]


def global_mean_nodes(x: torch.Tensor, tensor: int, kind: str, margin: float) -> tuple[torch.Tensor, list]:
    """The float ``[N, C]`` mean of ``x`` (NCHW) over height and width and its nodes reading graph
    tensor ``tensor``: MEAN in int8; in int16 (LiteRT's MEAN has no 16x8 form here) a whole-map
    AVERAGE_POOL_2D and a RESHAPE, as TensorFlow's converter writes a whole-map average pool."""
    window = (x.shape[2], x.shape[3])
    y = x.mean((2, 3))
    if kind == "int8":
        return y, [MeanNode((tensor,), (1, 2), calibrate_as(kind, y, margin))]
    return y, [AveragePool2DNode((tensor,), window, window, "VALID"), ReshapeNode((tensor + 1,), (y.shape[1],))]
