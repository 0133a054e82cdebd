"""Keyword spotting on real speech, through mixprec's integer engine (issue 4, example b).

The Free Spoken Digit Dataset (``../shared/data/fsdd``; 10 digits, 6 speakers; the dataset's
own split: takes 0-4 test = 300 recordings, the rest train = 2,700), each recording turned
into 8 steps x 16 log-mel bands (mixprec.datasets.spoken_digits), standardized with the
training set's per-band mean and deviation. The same topology as kws_synthetic.py (int8
frontend 16->8, float16 linear-attention head with residual and mean, int8 classifier 8->10),
calibrated on the training split; accuracy in float32 and through the pipeline on the test
split.

    python examples/kws_spoken_digits.py run | bench | golden | plot
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_modes import fit, run_modes  # noqa: E402

from mixprec.datasets.spoken_digits import spoken_digit_features  # noqa: E402
from mixprec.integer.models.kws import KeywordSpotter  # noqa: E402

STEPS, BANDS, WIDTH, DIGITS = 8, 16, 8, 10


@cache
def splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized train features and labels, then test features and labels."""
    train_x, train_y = spoken_digit_features("train", STEPS, BANDS)
    test_x, test_y = spoken_digit_features("test", STEPS, BANDS)
    mean, deviation = train_x.mean(axis=(0, 1)), train_x.std(axis=(0, 1))
    train_x, test_x = ((x - mean) / deviation for x in (train_x, test_x))
    return (torch.from_numpy(train_x.astype(np.float32)), torch.from_numpy(train_y),
            torch.from_numpy(test_x.astype(np.float32)), torch.from_numpy(test_y))


def make_model() -> KeywordSpotter:
    torch.manual_seed(0)
    return KeywordSpotter(BANDS, WIDTH, DIGITS, epsilon=4.0)


def train(model: KeywordSpotter) -> None:
    """AdamW (lr 1e-2, weight decay 1e-4), 3,000 steps of 128 training recordings."""
    x, y, _, _ = splits()
    fit(model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4), steps=3000, batch=128)


def calibration_set() -> torch.Tensor:
    """The whole training split (2,700 recordings): every int8 grid is calibrated on it."""
    return splits()[0]


def main(argv: list[str] | None = None) -> int:
    train_x, train_y, test_x, test_y = splits()
    return run_modes("kws_spoken_digits", make_model, train, calibration_set(), test_x, test_y, argv,
                     training=(train_x, train_y))


if __name__ == "__main__":
    sys.exit(main())
