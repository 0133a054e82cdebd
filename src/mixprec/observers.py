"""Range estimators: turn sample tensors into quantization parameters.

Each observer is fed tensors with :meth:`Observer.observe` (every value must be finite,
otherwise :class:`~mixprec.errors.CalibrationError`) and then asked for
:meth:`Observer.qparams`. Slots follow the spec's granularity (see
:mod:`mixprec.formats.affine`); every observed tensor must give the same slot count.

- :class:`MinMaxObserver`: running min and max.
- :class:`MovingAverageMinMaxObserver`: exponential moving average of per-batch min/max.
- :class:`PercentileObserver`: lower/upper percentiles of a bounded sample.
- :class:`MSEObserver`: the clipping range (a fraction of min/max) that minimizes the
  mean squared quantization error on a bounded sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixprec.errors import CalibrationError
from mixprec.formats import QParams, QuantSpec, fake_quantize, param_shape, qparams_from_range, slice_view


class Observer:
    """Base class: validates and reshapes observations into ``[slots, values]`` rows."""

    def __init__(self, spec: QuantSpec) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self._pshape: tuple[int, ...] | None = None
        self.batches = 0

    def observe(self, x: Tensor) -> None:
        """Record one tensor. Raises CalibrationError on NaN/Inf or a changed slot shape."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise CalibrationError(f"observers take floating-point tensors, got {type(x).__name__}")
        if x.numel() == 0:
            raise CalibrationError("observed an empty tensor; calibration batches need values")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(
                f"calibration data holds {bad} NaN/Inf values; clean the data or drop those batches"
            )
        pshape = param_shape(x.shape, self.spec)
        if self._pshape is not None and pshape != self._pshape:
            raise CalibrationError(
                f"observation has parameter shape {pshape}, earlier ones had {self._pshape}"
            )
        self._pshape = pshape
        self.batches += 1
        self._update(slice_view(x.detach().to(torch.float32), self.spec))

    def qparams(self) -> QParams:
        """Quantization parameters for everything observed so far."""
        if self._pshape is None:
            raise CalibrationError("no data observed; feed at least one calibration batch")
        lo, hi = self._range()
        return qparams_from_range(lo.reshape(self._pshape), hi.reshape(self._pshape), self.spec)

    def _update(self, rows: Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Range = smallest and largest value seen in each slot."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def _update(self, rows: Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def _range(self) -> tuple[Tensor, Tensor]:
        assert self._lo is not None and self._hi is not None
        return self._lo, self._hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Range = exponential moving average of per-batch min/max.

    ``avg <- avg + momentum * (batch - avg)``; the first batch initializes the average.
    """

    def __init__(self, spec: QuantSpec, momentum: float = 0.01) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        super().__init__(spec)
        self.momentum = momentum

    def _update(self, rows: Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
            return
        self._lo = self._lo + self.momentum * (lo - self._lo)
        self._hi = self._hi + self.momentum * (hi - self._hi)


class _SamplingObserver(Observer):
    """Keeps up to ``max_samples`` values per slot (a seeded uniform subsample)."""

    def __init__(self, spec: QuantSpec, max_samples: int = 1 << 18, seed: int = 0) -> None:
        if max_samples < 16:
            raise ValueError(f"max_samples must be >= 16, got {max_samples!r}")
        super().__init__(spec)
        self.max_samples = max_samples
        self._rows: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def _update(self, rows: Tensor) -> None:
        merged = rows if self._rows is None else torch.cat((self._rows, rows), dim=1)
        if merged.shape[1] > self.max_samples:
            keep = torch.randperm(merged.shape[1], generator=self._generator)[: self.max_samples]
            merged = merged[:, keep]
        self._rows = merged

    @property
    def samples(self) -> Tensor:
        assert self._rows is not None
        return self._rows


class PercentileObserver(_SamplingObserver):
    """Range = the ``(100 - percentile)``-th and ``percentile``-th percentiles per slot."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kwargs: int) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        super().__init__(spec, **kwargs)
        self.percentile = percentile

    def _range(self) -> tuple[Tensor, Tensor]:
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
        lo, hi = torch.quantile(self.samples, q, dim=1)
        return lo, hi


class MSEObserver(_SamplingObserver):
    """Range = ``r * [min, max]`` with ``r`` on a grid in ``[min_ratio, 1]`` chosen per slot
    to minimize the mean squared error of fake-quantized samples."""

    def __init__(self, spec: QuantSpec, min_ratio: float = 0.3, steps: int = 50, **kwargs: int) -> None:
        if not 0.0 < min_ratio < 1.0 or steps < 2:
            raise ValueError(f"need 0 < min_ratio < 1 and steps >= 2, got {min_ratio!r}, {steps!r}")
        super().__init__(spec, **kwargs)
        self.ratios = torch.linspace(min_ratio, 1.0, steps)

    def _range(self) -> tuple[Tensor, Tensor]:
        rows = self.samples
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        per_slot = QuantSpec(
            bits=self.spec.bits, signed=self.spec.signed, symmetric=self.spec.symmetric,
            granularity="channel", axis=0,
        )
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in self.ratios:
            qp = qparams_from_range(lo * ratio, hi * ratio, per_slot)
            err = (fake_quantize(rows, qp) - rows).square().mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * ratio, best_lo)
            best_hi = torch.where(better, hi * ratio, best_hi)
        return best_lo, best_hi


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, spec: QuantSpec) -> Observer:
    """Observer by name: one of ``minmax``, ``moving_average``, ``percentile``, ``mse``."""
    try:
        return OBSERVERS[name](spec)
    except KeyError:
        raise CalibrationError(
            f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}"
        ) from None
