"""GPTQ: weight rounding that compensates each column's rounding error in the columns
not yet quantized, using second-order statistics of the layer's inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022). For a linear layer ``y = x W^T`` with inputs ``X`` the layer's
squared output error is ``tr((W - Q) H (W - Q)^T)`` with ``H = 2/n X^T X``. Columns are
quantized left to right; after column ``i`` is rounded, its error ``e = (w_i - q_i) / U_ii``
is subtracted from the later columns as ``W[:, j] -= e * U_ij`` (``U`` the upper Cholesky
factor of ``H^-1``), which is the optimal update of the remaining weights (OBS).

Rounding of each value is still :func:`mixprec.formats.quantize` (ties to even,
saturation). Scales: per-channel and per-tensor schemes take their scales from the
original weight; per-group schemes take each group's scale from the (already updated)
weights when the group's first column is reached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mixprec.errors import CalibrationError
from mixprec.formats import QParams, QuantSpec, dequantize, qparams_from_tensor, quantize

#: Dampening added to the Hessian diagonal, as a fraction of its mean.
DEFAULT_DAMP = 0.01


class HessianAccumulator:
    """Accumulates ``H = 2/n sum_x x x^T`` (float64) over the rows of observed inputs."""

    def __init__(self, features: int) -> None:
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.features = features
        self.hessian = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def observe(self, x: Tensor) -> None:
        """Add the rows of ``x [..., features]``; refuses NaN/Inf."""
        if x.shape[-1] != self.features:
            raise CalibrationError(f"expected inputs with {self.features} features, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.features).to(torch.float64)
        if not torch.isfinite(rows).all():
            raise CalibrationError("calibration inputs hold NaN or Inf; GPTQ needs finite data")
        self.hessian += rows.t() @ rows
        self.rows += rows.shape[0]

    def value(self) -> Tensor:
        """``2/n X^T X`` over everything observed."""
        if self.rows == 0:
            raise CalibrationError("no calibration rows observed for GPTQ")
        return self.hessian * (2.0 / self.rows)


def _inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; dead inputs get 1."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_quantize(weight: Tensor, hessian: Tensor, spec: QuantSpec, damp: float = DEFAULT_DAMP,
                  scale_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, QParams]:
    """Quantize ``weight [out, in]`` column by column with GPTQ error compensation.

    Args:
        weight: float weight in the ``[out, in]`` layout.
        hessian: ``[in, in]`` from :class:`HessianAccumulator`.
        spec: ``channel`` (axis 0), ``tensor`` or ``group`` (along ``in``) granularity.
        damp: diagonal dampening as a fraction of the mean diagonal.
        scale_fn: applied to every scale before use (e.g. rounding to fp16 storage).

    Returns:
        ``(codes, qparams)`` with codes laid out like ``weight``.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}], got {tuple(hessian.shape)}")
    if spec.granularity == "channel" and spec.axis % 2 != 0:
        raise ValueError("GPTQ takes per-output-channel scales (axis 0)")
    transform = scale_fn or (lambda s: s)
    work = weight.detach().to(torch.float64).clone()
    upper = _inverse_cholesky(hessian.to(torch.float64), damp)
    codes = torch.empty(weight.shape, dtype=torch.int8 if spec.signed else torch.uint8)
    column_spec = QuantSpec(spec.bits, spec.signed, spec.symmetric, "channel", 0)
    if spec.granularity == "group":
        group = spec.group_size
        assert group is not None
        scales = torch.empty(out_features, in_features // group)
        zero_points = torch.empty(out_features, in_features // group, dtype=torch.int32)
    else:
        fixed = qparams_from_tensor(weight.detach().float(), spec)
        fixed = QParams(spec, transform(fixed.scale), fixed.zero_point)
        scale = fixed.scale.expand(out_features) if spec.granularity == "tensor" else fixed.scale
        zero_point = fixed.zero_point.expand(out_features) if spec.granularity == "tensor" else fixed.zero_point
        column_qp = QParams(column_spec, scale.contiguous(), zero_point.contiguous())
    for i in range(in_features):
        if spec.granularity == "group" and i % group == 0:
            j = i // group
            group_qp = qparams_from_tensor(work[:, i:i + group].float(), column_spec)
            scales[:, j] = transform(group_qp.scale)
            zero_points[:, j] = group_qp.zero_point
            column_qp = QParams(column_spec, scales[:, j].contiguous(), zero_points[:, j].contiguous())
        column = work[:, i].float()
        q = quantize(column, column_qp)
        codes[:, i] = q
        error = (work[:, i] - dequantize(q, column_qp).to(torch.float64)) / upper[i, i]
        work[:, i:] -= error.unsqueeze(1) * upper[i, i:].unsqueeze(0)
    if spec.granularity == "group":
        return codes, QParams(spec, scales, zero_points)
    return codes, fixed
