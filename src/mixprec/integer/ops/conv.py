"""Int8 and 16x8 2-D convolutions, TFLite reference semantics (``reference_integer_ops::ConvPerChannel``
and ``DepthwiseConvPerChannel``), on NHWC tensors.

For output position ``(n, y, x)`` and output channel ``c``::

    acc = bias[c] + sum (w[c, ky, kx, i] * (x[n, y * s_h - pad_h + ky * d_h, x * s_w - pad_w + kx * d_w, i]
                                             + input_offset))                      (exact, int32)
    out = clamp(MultiplyByQuantizedMultiplier(acc, multiplier[c], shift[c]) + output_offset, act_min, act_max)

over the kernel window and the input channels ``i`` (all of them for CONV_2D; for
DEPTHWISE_CONV_2D only ``i = c // depth_multiplier``, the filter being ``[1, kh, kw, out]``),
summed exactly (in float64, whose integers are exact far beyond the int32 accumulator).
Window points outside the image are skipped, as if they held the input zero point.
``input_offset = -input_zero_point``; the rescale is
:func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier`, gemmlowp's two roundings
(``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``): LiteRT's convolution
kernels round that way, unlike its fully connected kernel (one rounding); with the single
rounding, 19 of 15,360 outputs of a random stride-2 convolution came out 1 LSB off LiteRT.
Padding follows TFLite: ``VALID`` none; ``SAME`` an output of
``ceil(in / stride)`` and ``pad = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - in) // 2``
before (the odd remainder after). :func:`conv2d` runs mixprec's native kernel
(``kernels/csrc/tflite_conv.cpp``: the same integers, vectorized over output channels or input
channels) when it is built, else :func:`conv2d_reference`, the numpy statement above (float64
sums of exact integers, vectorized over the batch), which the native kernel is tested against.

16x8 (``dtype="int16"``): int16 activations with zero point 0, an int64 (or int32) bias, the
int64 accumulator rescaled by
:func:`~mixprec.integer.core.fixedpoint.multiply_by_quantized_multiplier_int64`, as
``reference_integer_ops::ConvPerChannel`` / ``DepthwiseConvPerChannel`` for int16. Pooling and
PAD take int16 tensors as they take int8 ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.fixedpoint import multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_int64
from mixprec.integer.core.tensors import CODE_RANGES, require_array, require_codes
from mixprec.integer.ops.fully_connected import AccumulatorRecord
from mixprec.integer.ops.mean import exact_sums
from mixprec.kernels import native

PADDINGS = ("SAME", "VALID")


def output_size(size: int, kernel: int, stride: int, dilation: int, padding: str) -> tuple[int, int]:
    """``(output size, padding before)`` along one spatial axis (TFLite's ComputePaddingHeightWidth)."""
    effective = (kernel - 1) * dilation + 1
    if padding == "VALID":
        return (size - effective + stride) // stride, 0
    out = (size + stride - 1) // stride
    return out, max(0, (out - 1) * stride + effective - size) // 2


@dataclass(frozen=True, eq=False)
class ConvParams(AccumulatorRecord):
    """Runtime record of a CONV_2D / DEPTHWISE_CONV_2D: integers and geometry only.

    ``weights`` int8 ``[out, kh, kw, in]`` (CONV_2D) or ``[1, kh, kw, out]`` (depthwise, with
    ``depth_multiplier`` = out / in); ``bias`` ``[out]`` or None; ``multiplier`` and ``shift``
    int32 ``[out]`` or ``[1]``; ``dtype`` the activations' type (int8 or int16). The window
    (kernel x input channels per output) is bounded by the fully connected layer's proofs.
    """

    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: str
    depthwise: bool = False
    activation_min: int = -128
    activation_max: int = 127
    dtype: str = "int8"
    #: The rescales of the int32 (int8) and int64 (16x8) accumulators (see module docstring).
    rescale_int32 = staticmethod(multiply_by_quantized_multiplier)
    rescale_int64 = staticmethod(multiply_by_quantized_multiplier_int64)

    def __post_init__(self) -> None:
        if self.weights.dtype != np.int8 or self.weights.ndim != 4:
            raise InputError(f"weights must be a 4-D int8 array, got {self.weights.dtype} {self.weights.shape}")
        if self.depthwise and self.weights.shape[0] != 1:
            raise InputError(f"depthwise weights are [1, kh, kw, out], got {self.weights.shape}")
        out = self.out_channels
        window = self.weights.shape[1] * self.weights.shape[2] * (1 if self.depthwise else self.weights.shape[3])
        if self.padding not in PADDINGS:
            raise InputError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if min(*self.stride, *self.dilation) < 1:
            raise InputError(f"strides and dilations must be >= 1, got {self.stride} and {self.dilation}")
        self.check_accumulator(out, window)

    @cached_property
    def native_packs(self) -> dict[tuple[int, ...], torch.Tensor]:
        """The native GEMM's packed weights per input image and geometry (filled by the native path)."""
        return {}

    @property
    def out_channels(self) -> int:
        return self.weights.shape[3] if self.depthwise else self.weights.shape[0]

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``[N, H', W', out]`` for an NHWC input shape."""
        if len(shape) != 4:
            raise InputError(f"a 2-D convolution takes NHWC input, got shape {shape}")
        channels = shape[3]
        if self.depthwise and self.out_channels % channels:
            raise InputError(f"depthwise output channels ({self.out_channels}) must be a multiple of the "
                             f"{channels} input channels")
        if not self.depthwise and channels != self.weights.shape[3]:
            raise InputError(f"CONV_2D weights take {self.weights.shape[3]} input channels, got {channels}")
        (kh, kw), (sh, sw), (dh, dw) = self.weights.shape[1:3], self.stride, self.dilation
        height, _ = output_size(shape[1], kh, sh, dh, self.padding)
        width, _ = output_size(shape[2], kw, sw, dw, self.padding)
        if height < 1 or width < 1:
            raise InputError(f"a {kh}x{kw} kernel (dilation {self.dilation}) does not fit the {shape[1]}x{shape[2]} "
                             "input with VALID padding")
        return shape[0], height, width, self.out_channels


def _windows(x: NDArray, params: ConvParams, out_h: int, out_w: int) -> NDArray[np.float64]:
    """``[N, H', W', kh, kw, C]``: each output position's window of ``x + input_offset`` (zero
    outside the image), as float64 integers."""
    kh, kw = params.weights.shape[1:3]
    (sh, sw), (dh, dw) = params.stride, params.dilation
    _, pad_top = output_size(x.shape[1], kh, sh, dh, params.padding)
    _, pad_left = output_size(x.shape[2], kw, sw, dw, params.padding)
    need_h, need_w = (out_h - 1) * sh + (kh - 1) * dh + 1, (out_w - 1) * sw + (kw - 1) * dw + 1
    shifted = x.astype(np.float64) + params.input_offset
    padded = np.zeros((x.shape[0], max(need_h, pad_top + x.shape[1]), max(need_w, pad_left + x.shape[2]),
                       x.shape[3]), dtype=np.float64)
    padded[:, pad_top:pad_top + x.shape[1], pad_left:pad_left + x.shape[2]] = shifted
    rows = (np.arange(out_h) * sh)[:, None] + np.arange(kh) * dh  # [H', kh]
    cols = (np.arange(out_w) * sw)[:, None] + np.arange(kw) * dw  # [W', kw]
    return padded[:, rows[:, None, :, None], cols[None, :, None, :], :]


def conv2d(x: NDArray, params: ConvParams) -> NDArray:
    """``x`` ``[N, H, W, C]`` of the record's type (int8 or int16) -> the same type
    ``[N, H', W', out]`` (see module docstring): by mixprec's native kernel when it is built
    (``csrc/tflite_conv.cpp``, the same arithmetic in integers), else by
    :func:`conv2d_reference`."""
    require_array("conv2d", x, np.dtype(params.dtype).type)
    if native.available():
        return _conv2d_native(x, params)
    return conv2d_reference(x, params)


def conv2d_after_pad(x: NDArray, params: ConvParams, paddings: tuple[tuple[int, int], tuple[int, int]]) -> NDArray:
    """A VALID convolution of ``x`` padded by ``paddings`` (``(top, bottom), (left, right)``) with its zero point:
    the PAD and the convolution of TensorFlow's converter in one call (the points of the padding contribute 0,
    as the convolution's own padding does). By the native kernel when it is built, else as the two operators."""
    require_array("conv2d", x, np.dtype(params.dtype).type)
    (top, bottom), (left, right) = paddings
    if params.padding != "VALID" or min(top, bottom, left, right) < 0:
        raise InputError(f"a padded convolution is VALID after non-negative paddings, got {params.padding} after "
                         f"{paddings}")
    if x.ndim != 4:
        raise InputError(f"a 2-D convolution takes NHWC input, got shape {x.shape}")
    padded = (x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right, x.shape[3])
    if not native.available():
        return conv2d_reference(pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), -params.input_offset), params)
    return _conv2d_native(x, params, padded, (top, left))


def _conv2d_native(x: NDArray, params: ConvParams, padded: tuple[int, ...] | None = None,
                   before: tuple[int, int] = (0, 0)) -> NDArray:
    """The native kernel on ``x``; with ``padded`` (the padded input's shape, ``before`` its top and left
    paddings) the VALID convolution of the padded input."""
    arguments = native_conv_arguments(params, x.shape, padded, before)
    return native.tflite_conv2d(torch.from_numpy(np.ascontiguousarray(x)), *arguments).numpy()


def native_conv_arguments(params: ConvParams, shape: tuple[int, ...], padded: tuple[int, ...] | None = None,
                          before: tuple[int, int] = (0, 0)) -> tuple:
    """The native kernel's arguments after its input, for an input of NHWC ``shape`` (any batch; with
    ``padded``, the padded input's shape, and ``before``, its top and left paddings, the VALID convolution
    of the padded input): the record's constants, the geometry, offsets, clamp, and the packed weights."""
    _, out_h, out_w, _ = params.output_shape(padded or shape)
    (kh, kw), (sh, sw), (dh, dw) = params.weights.shape[1:3], params.stride, params.dilation
    pad_top = output_size(shape[1], kh, sh, dh, params.padding)[1] + before[0]
    pad_left = output_size(shape[2], kw, sw, dw, params.padding)[1] + before[1]
    weights, bias, multiplier, shift = params.native_constants
    geometry = (sh, sw, dh, dw, pad_top, pad_left, out_h, out_w)
    return (weights, bias, multiplier, shift, *geometry, params.input_offset, params.output_offset,
            params.activation_min, params.activation_max, params.depthwise, _prepacked(params, shape[1:], geometry))


def _prepacked(params: ConvParams, image: tuple[int, ...], geometry: tuple[int, ...]) -> torch.Tensor | None:
    """The native kernel's weights packed once and kept in the record: a CONV_2D's GEMM for an input image
    ``[H, W, C]`` and ``geometry`` (made on the first call of that size), a depthwise convolution's for any
    size (None for 16x8)."""
    if params.dtype != "int8":
        return None
    key = ("depthwise",) if params.depthwise else (*image, *geometry)
    if key not in params.native_packs:
        weights, bias, multiplier, shift = params.native_constants
        params.native_packs[key] = (
            native.tflite_depthwise_pack(weights, bias, multiplier, shift, params.input_offset) if params.depthwise
            else native.tflite_conv2d_pack(weights, bias, *image, *geometry, params.input_offset))
    return params.native_packs[key]


def conv2d_reference(x: NDArray, params: ConvParams) -> NDArray:
    """The numpy statement of :func:`conv2d` (float64 BLAS sums of exact integers), which the
    native kernel is pinned to."""
    require_array("conv2d", x, np.dtype(params.dtype).type)
    n, out_h, out_w, out = params.output_shape(x.shape)
    # Integer sums in float64 (BLAS): every partial sum is an integer below 2**24 * 2**15 * 2**7 = 2**46
    # (the accumulator proofs), inside float64's exact range, so the result is the exact accumulator.
    windows = _windows(x, params, out_h, out_w)  # [N, H', W', kh, kw, C]
    weights = params.weights.astype(np.float64)
    if params.depthwise:
        multiplier = out // x.shape[3]
        if multiplier > 1:  # channel i feeds outputs i*m .. i*m + m - 1
            windows = np.repeat(windows, multiplier, axis=-1)
        acc = np.einsum("nyxhwc,hwc->nyxc", windows, weights[0], optimize=True)
    else:
        acc = windows.reshape(n * out_h * out_w, -1) @ weights.reshape(out, -1).T
    acc = acc.astype(np.int64).reshape(n, out_h, out_w, out)
    if params.bias is not None:
        acc += params.bias
    return params.rescale(acc)


POOLS = ("AVERAGE", "MAX")


@dataclass(frozen=True)
class PoolParams:
    """Runtime record of an AVERAGE_POOL_2D / MAX_POOL_2D on int8 or int16 (``dtype``; the output
    keeps the input's type and quantization, as TFLite requires)."""

    kind: str
    filter: tuple[int, int]
    stride: tuple[int, int]
    padding: str
    activation_min: int = -128
    activation_max: int = 127
    dtype: str = "int8"

    def __post_init__(self) -> None:
        if self.kind not in POOLS or self.padding not in PADDINGS:
            raise InputError(f"pooling needs kind in {POOLS} and padding in {PADDINGS}, got {self.kind!r}, "
                             f"{self.padding!r}")
        if min(*self.filter, *self.stride) < 1:
            raise InputError(f"filter and stride sizes must be >= 1, got {self.filter} and {self.stride}")
        if self.dtype not in CODE_RANGES:
            raise InputError(f"pooling takes int8 or int16 tensors, got {self.dtype!r}")
        low, high = CODE_RANGES[self.dtype]
        if not low <= self.activation_min <= self.activation_max <= high:
            raise InputError(f"activation range [{self.activation_min}, {self.activation_max}] is not within "
                             f"[{low}, {high}] or is empty")

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        if len(shape) != 4:
            raise InputError(f"pooling takes NHWC input, got shape {shape}")
        height, _ = output_size(shape[1], self.filter[0], self.stride[0], 1, self.padding)
        width, _ = output_size(shape[2], self.filter[1], self.stride[1], 1, self.padding)
        if height < 1 or width < 1:
            raise InputError(f"a {self.filter} pooling window does not fit the {shape[1]}x{shape[2]} input with "
                             "VALID padding")
        return shape[0], height, width, shape[3]


def pool2d(x: NDArray, params: PoolParams) -> NDArray:
    """TFLite's reference int8 / int16 pooling over each window's in-image points (padding is skipped, not
    counted): MAX takes their largest value; AVERAGE their sum ``s`` over their count ``c``,
    rounded half away from zero in integers (``(s + c/2) / c`` for ``s > 0``, ``(s - c/2) / c``
    otherwise, C division truncating toward zero); then the activation clamp."""
    require_array("pool2d", x, np.dtype(params.dtype).type)
    n, out_h, out_w, channels = params.output_shape(x.shape)
    (kh, kw), (sh, sw) = params.filter, params.stride
    _, pad_top = output_size(x.shape[1], kh, sh, 1, params.padding)
    _, pad_left = output_size(x.shape[2], kw, sw, 1, params.padding)
    rows = (np.arange(out_h) * sh - pad_top)[:, None] + np.arange(kh)  # [H', kh] input rows, maybe outside
    cols = (np.arange(out_w) * sw - pad_left)[:, None] + np.arange(kw)
    inside = (((rows >= 0) & (rows < x.shape[1]))[:, None, :, None]
              & ((cols >= 0) & (cols < x.shape[2]))[None, :, None, :])  # [H', W', kh, kw]
    count = inside.sum(axis=(2, 3))[None, :, :, None]
    if out_h == out_w == 1 and count.item() == x.shape[1] * x.shape[2]:
        # one window over the whole map (global pooling): reduced in place, no int64 copy of the windows
        if params.kind == "MAX":
            result = x.max(axis=(1, 2), keepdims=True).astype(np.int64)
        else:
            result = _rounded_average(exact_sums(x, (1, 2)).reshape(n, 1, 1, channels), count)
    else:
        windows = x.astype(np.int64)[:, np.clip(rows, 0, x.shape[1] - 1)[:, None, :, None],
                                     np.clip(cols, 0, x.shape[2] - 1)[None, :, None, :], :]  # [N, H', W', kh, kw, C]
        mask = inside[None, :, :, :, :, None]
        if params.kind == "MAX":
            result = np.where(mask, windows, np.iinfo(np.int64).min).max(axis=(3, 4))
        else:
            result = _rounded_average(np.where(mask, windows, 0).sum(axis=(3, 4)), count)
    return np.clip(result, params.activation_min, params.activation_max).astype(params.dtype).reshape(
        n, out_h, out_w, channels)


def _rounded_average(total: NDArray[np.int64], count: NDArray) -> NDArray[np.int64]:
    """``total / count`` rounded half away from zero in integers (C division truncating toward zero)."""
    offset = np.where(total > 0, count // 2, -(count // 2))
    numerator = total + offset
    return np.sign(numerator) * (np.abs(numerator) // count)


def pad(x: NDArray, paddings: tuple[tuple[int, int], ...], zero_point: int) -> NDArray:
    """TFLite's PAD of an int8 or int16 tensor: ``paddings[d] = (before, after)`` per dimension,
    filled with the tensor's zero point (a real zero); the type and quantization are unchanged."""
    require_codes("pad", x)
    if len(paddings) != x.ndim or any(p < 0 for pair in paddings for p in pair):
        raise InputError(f"PAD needs one non-negative (before, after) pair per dimension of a {x.ndim}-D "
                         f"tensor, got {paddings}")
    out = np.full(tuple(size + before + after for size, (before, after) in zip(x.shape, paddings)), zero_point, x.dtype)
    out[tuple(slice(before, before + size) for size, (before, _) in zip(x.shape, paddings))] = x
    return out
