"""Shape-only ("fake") implementations of mixprec's native operators, for ``torch.compile``.

``torch.compile`` traces a model with fake tensors (shapes and dtypes, no data); an operator
without a fake implementation stops the trace. Each function below says what its C++ operator
(``csrc/*.cpp``, ``torch.ops.mixprec.*``) returns, allocating nothing real; the compiled graph
then calls the real kernel, so a compiled model gives the eager model's bits. Registered once,
right after the native library loads (:func:`register`).
"""

from __future__ import annotations

import torch
from torch import Tensor

_REGISTERED: list[str] = []


def _rows_and_scale(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _linear_out(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


def _quantize_rows_s8(x: Tensor) -> tuple[Tensor, Tensor]:
    return _rows_and_scale(x, torch.int8)


def _quantize_rows_u8(x: Tensor) -> tuple[Tensor, Tensor]:
    return _rows_and_scale(x, torch.uint8)


def _quantize_rows_static_s8(x: Tensor, scale: float, zero_point: int) -> tuple[Tensor, Tensor]:  # noqa: ARG001
    return _rows_and_scale(x, torch.int8)


def _quantize_rows_static_s8_t(x: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ARG001
    return _rows_and_scale(x, torch.int8)


def _quantize_samples_u8(x: Tensor, samples: int, scale: float, zero_point: int) -> tuple[Tensor, Tensor]:  # noqa: ARG001
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((samples,), dtype=torch.float32)


def _int8_linear_dynamic(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(x, weight.shape[0])


def _w8_linear_rows(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(x, weight.shape[0])


def _w4_linear_rows(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(x, packed.shape[0])


def _w4a8_linear(xq: Tensor, x_scale: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(xq, packed.shape[0])


def _int8_packed_rows(q: Tensor, row_scale: Tensor, packed: Tensor, col_scale: Tensor,  # noqa: ARG001
                      bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(q, col_scale.shape[0])


def _w4a8_linear_blocked(xq: Tensor, x_scale: Tensor, codes: Tensor, scale: Tensor,  # noqa: ARG001
                         out_features: int, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(xq, out_features)


def _w4a8_linear_blocked_many(xq: Tensor, x_scale: Tensor, codes: list[Tensor], scales: list[Tensor],  # noqa: ARG001
                              out_features: list[int], biases: list[Tensor | None]) -> list[Tensor]:  # noqa: ARG001
    return [_linear_out(xq, n) for n in out_features]


def _int8_dense_rows(q: Tensor, row_scale: Tensor, weight: Tensor, col_scale: Tensor,  # noqa: ARG001
                     bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return _linear_out(q, weight.shape[0])


def _rescale_rows_cols(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ARG001
    return acc.new_empty(acc.shape, dtype=torch.float32)


def _rescale_rows_cols_(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None) -> None:  # noqa: ARG001
    return None  # rescaled in place, into acc


def _w4_dequantize_rows(packed: Tensor, scale: Tensor, begin: int, out: Tensor) -> None:  # noqa: ARG001
    return None  # writes into `out`


def _tflite_conv2d(x: Tensor, w: Tensor, bias: Tensor | None, multiplier: Tensor, shift: Tensor,  # noqa: ARG001
                   stride_h: int, stride_w: int, dilation_h: int, dilation_w: int, pad_top: int,  # noqa: ARG001
                   pad_left: int, out_h: int, out_w: int, input_offset: int, output_offset: int,  # noqa: ARG001
                   act_min: int, act_max: int, depthwise: bool,  # noqa: ARG001
                   prepacked: Tensor | None = None, residual: Tensor | None = None,  # noqa: ARG001
                   add_table: Tensor | None = None, add_fit: Tensor | None = None,  # noqa: ARG001
                   residual_first: bool = False) -> Tensor:  # noqa: ARG001
    channels = w.shape[3] if depthwise else w.shape[0]
    return x.new_empty((x.shape[0], out_h, out_w, channels))


def _tflite_sum_middle(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[2]), dtype=torch.int32)


def _tflite_mean_middle(x: Tensor, correction: int, multiplier: int, shift: int, offset: int,  # noqa: ARG001
                        low: int, high: int) -> Tensor:  # noqa: ARG001
    return x.new_empty((x.shape[0], x.shape[2]))


def _tflite_fully_connected(x: Tensor, w: Tensor, bias: Tensor | None, multiplier: Tensor,  # noqa: ARG001
                            shift: Tensor, input_offset: int, output_offset: int, act_min: int,  # noqa: ARG001
                            act_max: int) -> Tensor:  # noqa: ARG001
    return x.new_empty((x.shape[0], w.shape[0]))


def _tflite_requantize(x: Tensor, input_offset: int, multiplier: int, shift: int,  # noqa: ARG001
                       output_offset: int, wide: bool) -> Tensor:  # noqa: ARG001
    return x.new_empty(x.shape, dtype=torch.int16 if wide else torch.int8)


def _tflite_add(a: Tensor, b: Tensor, *record: int) -> Tensor:  # noqa: ARG001
    return a.new_empty(a.shape)


def _tflite_add_fit(table: Tensor, *record: int) -> Tensor:  # noqa: ARG001
    return table.new_empty((7,), dtype=torch.float32)


def _tflite_quantize_nchw(x: Tensor, scale: float, zero_point: int, wide: bool) -> Tensor:  # noqa: ARG001
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), dtype=torch.int16 if wide else torch.int8)


def _tflite_dequantize(q: Tensor, scale: float, zero_point: int) -> Tensor:  # noqa: ARG001
    return q.new_empty(q.shape, dtype=torch.float32)


_FAKES = {
    "quantize_rows_s8": _quantize_rows_s8,
    "quantize_rows_u8": _quantize_rows_u8,
    "quantize_rows_static_s8": _quantize_rows_static_s8,
    "quantize_rows_static_s8_t": _quantize_rows_static_s8_t,
    "quantize_samples_u8": _quantize_samples_u8,
    "int8_linear_dynamic": _int8_linear_dynamic,
    "w8_linear_rows": _w8_linear_rows,
    "w8g_linear_rows": _w8_linear_rows,
    "w4_linear_rows": _w4_linear_rows,
    "w4a8_linear": _w4a8_linear,
    "w4a8_linear_blocked": _w4a8_linear_blocked,
    "w4a8_linear_blocked_many": _w4a8_linear_blocked_many,
    "int8_packed_rows": _int8_packed_rows,
    "int8_dense_rows": _int8_dense_rows,
    "rescale_rows_cols": _rescale_rows_cols,
    "rescale_rows_cols_": _rescale_rows_cols_,
    "w4_dequantize_rows": _w4_dequantize_rows,
    "tflite_conv2d": _tflite_conv2d,
    "tflite_sum_middle": _tflite_sum_middle,
    "tflite_mean_middle": _tflite_mean_middle,
    "tflite_requantize": _tflite_requantize,
    "tflite_fully_connected": _tflite_fully_connected,
    "tflite_add": _tflite_add,
    "tflite_add_lookup": _tflite_add,
    "tflite_add_fit": _tflite_add_fit,
    "tflite_quantize_nchw": _tflite_quantize_nchw,
    "tflite_dequantize": _tflite_dequantize,
}


def register() -> list[str]:
    """Register every fake implementation above (once); returns the operator names covered."""
    if not _REGISTERED:
        for name, fake in _FAKES.items():
            torch.library.register_fake(f"mixprec::{name}")(fake)
            _REGISTERED.append(name)
    return list(_REGISTERED)
