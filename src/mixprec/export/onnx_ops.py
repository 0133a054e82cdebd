"""Operator pieces shared by the ONNX writers of Linears (:mod:`mixprec.export.onnx`) and
convolutions (:mod:`mixprec.export.onnx_conv`), emitted inside TorchScript ``symbolic`` methods."""

from __future__ import annotations

import torch


def constant(g: object, value: float | list[int], dtype: torch.dtype = torch.float32) -> object:
    """An ONNX ``Constant`` holding ``value`` as ``dtype``."""
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def absent(value: object) -> bool:
    """Whether a traced optional input (a bias, a static scale) was None."""
    return value is None or value.node().mustBeNone()


def rescale(g: object, acc: object, row_scale: object, col_scale: object, bias: object) -> object:
    """``(float(acc) * row_scale) * col_scale + bias``, one float32 rounding per step (mixprec's
    rescale of an int32 accumulator)."""
    y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=1), row_scale), col_scale)
    return y if absent(bias) else g.op("Add", y, bias)
