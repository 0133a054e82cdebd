"""Observers turn calibration samples into parameters; bad samples are refused."""

from __future__ import annotations

import pytest
import torch

from mixprec import CalibrationError
from mixprec.formats import QuantSpec, fake_quantize
from mixprec.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)

ASYM = QuantSpec(bits=8, signed=True, symmetric=False)


def test_minmax_tracks_the_extremes_over_batches() -> None:
    obs = MinMaxObserver(ASYM)
    obs.observe(torch.tensor([0.0, 1.0]))
    obs.observe(torch.tensor([-2.0, 0.5]))
    qp = obs.qparams()
    assert float(qp.scale) == pytest.approx(3.0 / 255.0)


def test_moving_average_follows_the_documented_update() -> None:
    obs = MovingAverageMinMaxObserver(ASYM, momentum=0.5)
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.observe(torch.tensor([-3.0, 3.0]))
    assert float(obs.qparams().scale) == pytest.approx(4.0 / 255.0)  # range [-2, 2]


def test_percentile_ignores_rare_outliers() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=generator)
    x[0] = 1000.0
    pct = PercentileObserver(ASYM, percentile=99.9)
    pct.observe(x)
    assert float(pct.qparams().scale) < 0.05  # about 6.6 / 255; min/max would give ~4.0


def test_mse_observer_beats_minmax_on_heavy_tails() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=generator) ** 3
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse.observe(x)
    mm.observe(x)
    error_mse = (fake_quantize(x, mse.qparams()) - x).square().mean()
    error_mm = (fake_quantize(x, mm.qparams()) - x).square().mean()
    assert error_mse < 0.7 * error_mm


def test_per_channel_observation_gives_one_scale_per_channel() -> None:
    obs = MinMaxObserver(QuantSpec(granularity="channel", axis=1))
    obs.observe(torch.tensor([[1.0, -4.0], [0.5, 2.0]]))
    assert obs.qparams().scale.tolist() == pytest.approx([1 / 127, 4 / 127])


@pytest.mark.parametrize("name", ["minmax", "moving_average", "percentile", "mse"])
def test_observers_refuse_nan_inf_and_empty(name: str) -> None:
    obs = make_observer(name, ASYM)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        obs.observe(torch.tensor([1.0, float("inf")]))
    with pytest.raises(CalibrationError, match="no data observed"):
        obs.qparams()
    with pytest.raises(CalibrationError, match="empty"):
        obs.observe(torch.zeros(0))


def test_unknown_observer_names_the_choices() -> None:
    with pytest.raises(CalibrationError, match="minmax, moving_average, percentile, mse"):
        make_observer("kl", ASYM)
