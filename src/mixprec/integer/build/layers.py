"""Builders: float PyTorch modules plus calibration data -> the engine's integer and half
records. Runtime records hold integers (or half values); every float decision is made here.

- :func:`calibrate`: asymmetric int8 from the observed min/max, widened to include 0 (and
  optionally by a margin beyond the data): ``scale = float32((max - min) / 255)``,
  ``zero_point = clamp(round_half_even(-128 - min / scale))``.
- :func:`calibrate_int16`: TFLite's 16x8 activations: symmetric int16, zero point 0,
  ``scale = float32(max|x| / 32767)`` (widened by the margin likewise).
- :func:`fully_connected_from`: symmetric int8 weights per output channel (or per tensor),
  ``scale = float32(max|w| / 127)``, ``code = round_half_even(w / scale)`` in [-127, 127];
  bias ``round_half_even(b / float32(s_in * s_w))`` as the TFLite converter stores it: int32
  for int8 activations, int64 for int16 (:func:`bias_codes`).
- :func:`half_linear_from` / :func:`linear_attention_from`: weights rounded once to the half
  format (nearest, ties to even).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.core.tensors import Quantization
from mixprec.integer.graph.nodes import FullyConnectedNode
from mixprec.integer.half.formats import round_to_format
from mixprec.integer.half.ops import HalfLinearParams, LinearAttentionParams


def _numpy(values: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64).cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _calibration_values(samples: ArrayLike | torch.Tensor, margin: float) -> np.ndarray:
    """``samples`` as float64, refusing an empty or non-finite set and a margin outside [0, 1]."""
    if not 0.0 <= margin <= 1.0:
        raise InputError(f"the range margin is a fraction of the calibrated range in [0, 1], got {margin!r}")
    values = _numpy(samples)
    if values.size == 0 or not np.isfinite(values).all():
        raise InputError(f"calibration needs finite samples, got {values.size} values"
                         f"{' with NaN/Inf' if values.size else ''}")
    return values


def calibrate(samples: ArrayLike | torch.Tensor, margin: float = 0.0) -> Quantization:
    """Per-tensor asymmetric int8 quantization covering ``samples`` and 0 (see module docstring).

    ``margin``: each end the data set (not an end at 0) moves out by ``margin`` times the
    covered range, so unseen inputs that reach a little past the calibration data are not
    clipped, at the price of a step ``1 + 2 * margin`` times coarser (at most)."""
    values = _calibration_values(samples, margin)
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    pad = margin * (high - low)
    low, high = low - pad if low < 0 else low, high + pad if high > 0 else high
    if high == low:
        return Quantization.per_tensor(1.0, 0)
    scale = float(np.float32((high - low) / 255))
    zero_point = int(np.clip(np.round(-128 - low / scale), -128, 127))
    return Quantization.per_tensor(scale, zero_point)


def calibrate_int16(samples: ArrayLike | torch.Tensor, margin: float = 0.0) -> Quantization:
    """Symmetric int16 quantization (zero point 0) covering ``samples`` (see module docstring)."""
    values = _calibration_values(samples, margin)
    peak = float(np.abs(values).max()) * (1 + 2 * margin)
    return Quantization.per_tensor(peak / 32767 if peak > 0 else 1.0, 0)


def calibrate_as(dtype: str, samples: ArrayLike | torch.Tensor, margin: float = 0.0) -> Quantization:
    """:func:`calibrate` for ``"int8"``, :func:`calibrate_int16` for ``"int16"``."""
    return calibrate_int16(samples, margin) if dtype == "int16" else calibrate(samples, margin)


def activation_types(stages: Sequence[str], activations: str | Mapping[str, str]) -> dict[str, str]:
    """One activation type per stage name: ``"int8"`` or ``"int16"`` for every stage, or a mapping
    of some stages to those types (the others int8). Unknown stages and other types are refused."""
    kinds = ("int8", "int16")
    if isinstance(activations, str):
        if activations not in kinds:
            raise InputError(f"activations must be 'int8' or 'int16' (16x8), or a type per stage, got {activations!r}")
        return dict.fromkeys(stages, activations)
    if not isinstance(activations, Mapping):
        raise InputError(f"activations must be 'int8', 'int16' or a mapping of stage names to those, got "
                         f"{type(activations).__name__}")
    unknown = sorted(set(activations) - set(stages))
    wrong = {name: kind for name, kind in activations.items() if kind not in kinds}
    if unknown or wrong:
        raise InputError(f"activation types per stage take the stages {list(stages)} and the types int8 / int16: "
                         f"unknown stages {unknown}, types other than int8 / int16 {wrong}")
    return {name: activations.get(name, "int8") for name in stages}


def symmetric_int8_weights(weight: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Int8 codes (``weight``'s shape) and float32 scales (``[out]``, or ``[1]`` per tensor) of a
    float weight whose first axis is the output channel (see module docstring)."""
    if not np.isfinite(weight).all():
        raise InputError("the layer's weights hold NaN or Inf")
    rows = weight.reshape(weight.shape[0], -1)
    peak = np.abs(rows).max(axis=1) if per_channel else np.array([np.abs(rows).max()])
    scales = np.maximum(peak, np.finfo(np.float32).tiny).astype(np.float32) / np.float32(127)
    per_row = scales.astype(np.float64)[:, None] if per_channel else float(scales[0])
    return np.clip(np.round(rows / per_row), -127, 127).astype(np.int8).reshape(weight.shape), scales


def bias_codes(bias: torch.Tensor | None, input_quant: Quantization, scales: np.ndarray,
               activations: str = "int8") -> np.ndarray | None:
    """``round_half_even(b / float32(s_in * s_w))``: int32 for int8 activations, int64 for int16
    (16x8); None without a bias."""
    if bias is None:
        return None
    grid = (np.float32(input_quant.scale32[0]) * scales).astype(np.float32).astype(np.float64)
    codes = np.round(_numpy(bias) / grid)
    bits, dtype = (46, np.int64) if activations == "int16" else (30, np.int32)
    if np.abs(codes).max(initial=0) >= 2**bits:
        raise InputError(f"a bias is too large for its {np.dtype(dtype).name} grid (|b / (s_in * s_w)| >= 2^{bits})")
    return codes.astype(dtype)


def fully_connected_from(linear: nn.Linear, input_tensor: int, input_quant: Quantization,
                         output_quant: Quantization, activation: str = "none",
                         per_channel: bool = True, activations: str = "int8") -> FullyConnectedNode:
    """A FULLY_CONNECTED node reading graph tensor ``input_tensor`` whose ``activations`` are
    int8 or int16 (16x8), see module docstring."""
    if not isinstance(linear, nn.Linear):
        raise InputError(f"fully_connected_from takes an nn.Linear, got {type(linear).__name__}")
    codes, scales = symmetric_int8_weights(_numpy(linear.weight), per_channel)
    bias = bias_codes(linear.bias, input_quant, scales, activations)
    weight_quant = Quantization(tuple(float(s) for s in scales), (0,) * len(scales))
    return FullyConnectedNode((input_tensor,), codes, weight_quant, bias, output_quant, activation)


def half_linear_from(linear: nn.Linear, dtype: str) -> HalfLinearParams:
    """The layer's weights and bias rounded to ``dtype``."""
    if not isinstance(linear, nn.Linear):
        raise InputError(f"half_linear_from takes an nn.Linear, got {type(linear).__name__}")
    weight = round_to_format(_numpy(linear.weight), dtype).astype(np.float32)
    bias = round_to_format(_numpy(linear.bias), dtype).astype(np.float32) if linear.bias is not None else None
    return HalfLinearParams(weight, bias, dtype)


def linear_attention_from(query: nn.Linear, key: nn.Linear, value: nn.Linear, epsilon: float,
                          dtype: str) -> LinearAttentionParams:
    """A linear-attention record from three projections; ``epsilon`` is rounded to ``dtype``."""
    rounded_epsilon = float(round_to_format(np.float64(epsilon), dtype))
    return LinearAttentionParams(half_linear_from(query, dtype), half_linear_from(key, dtype),
                                 half_linear_from(value, dtype), rounded_epsilon)
