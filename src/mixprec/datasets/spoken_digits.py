"""The Free Spoken Digit Dataset (``fsdd/recordings/{digit}_{speaker}_{take}.wav``, 8 kHz mono
16-bit) and a log-mel front end that turns each recording into a fixed ``[steps, bands]`` grid.

Split: the dataset's own convention, takes 0-4 for test and the rest for training. Search
order for the folder: the explicit ``root`` (a data folder holding ``fsdd/``), then
``$MIXPREC_DATA``, then ``~/.cache/mixprec`` (see :mod:`mixprec.datasets.text_tasks`).

Front end (:func:`log_mel_segments`): 32 ms Hann frames every 16 ms (256 / 128 samples at
8 kHz), power spectrum, an HTK-style triangular mel filterbank over 0-4 kHz, ``log(energy +
1e-6)``; frames below 1% of the loudest frame's energy at both ends are trimmed; the frames
left are split into ``steps`` equal runs, each averaged.
"""

from __future__ import annotations

import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixprec.datasets.text_tasks import data_roots
from mixprec.errors import DataError, InputError

FILE_PATTERN = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
TEST_TAKES = range(0, 5)
FRAME, HOP = 256, 128


@dataclass(frozen=True)
class Recording:
    digit: int
    speaker: str
    take: int
    audio: np.ndarray  # float32 in [-1, 1)
    rate: int


def locate(root: str | os.PathLike[str] | None = None) -> Path:
    """The ``fsdd/recordings`` folder (see module docstring)."""
    candidates = [Path(root)] if root is not None else data_roots()
    for folder in candidates:
        if (folder / "fsdd" / "recordings").is_dir():
            return folder / "fsdd" / "recordings"
    raise DataError(f"fsdd/recordings not found under {', '.join(map(str, candidates))}; pass a data folder "
                    "holding fsdd/ or set MIXPREC_DATA")


def load_recordings(split: str, root: str | os.PathLike[str] | None = None) -> list[Recording]:
    """Every recording of ``split`` (``"train"`` or ``"test"``), sorted by file name."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    recordings = []
    for path in sorted(locate(root).iterdir()):
        match = FILE_PATTERN.match(path.name)
        if not match:
            continue
        digit, speaker, take = int(match[1]), match[2], int(match[3])
        if (take in TEST_TAKES) != (split == "test"):
            continue
        with wave.open(str(path)) as source:
            if source.getnchannels() != 1 or source.getsampwidth() != 2:
                raise DataError(f"{path}: expected mono 16-bit audio")
            rate, frames = source.getframerate(), source.readframes(source.getnframes())
        audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768
        recordings.append(Recording(digit, speaker, take, audio, rate))
    if not recordings:
        raise DataError(f"no {split} recordings in {locate(root)}")
    return recordings


def mel_filterbank(bands: int, rate: int, frame: int = FRAME) -> np.ndarray:
    """``[bands, frame // 2 + 1]`` triangular filters equally spaced on the HTK mel scale
    ``2595 * log10(1 + f / 700)`` between 0 Hz and ``rate / 2``."""
    def mel(f: np.ndarray) -> np.ndarray:
        return 2595 * np.log10(1 + f / 700)

    edges_mel = np.linspace(0, mel(np.array(rate / 2)), bands + 2)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    bins = np.linspace(0, rate / 2, frame // 2 + 1)
    filters = np.zeros((bands, bins.size))
    for band in range(bands):
        low, centre, high = edges[band:band + 3]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        filters[band] = np.clip(np.minimum(rising, falling), 0, None)
    return filters


def log_mel_segments(audio: np.ndarray, rate: int, steps: int, bands: int) -> np.ndarray:
    """``[steps, bands]`` float32 log-mel features of one recording (see module docstring)."""
    if audio.size < FRAME:
        audio = np.pad(audio, (0, FRAME - audio.size))
    count = 1 + (audio.size - FRAME) // HOP
    frames = np.stack([audio[i * HOP:i * HOP + FRAME] for i in range(count)]) * np.hanning(FRAME)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    energy = power.sum(axis=1)
    loud = np.flatnonzero(energy >= 0.01 * energy.max())
    power = power[loud[0]:loud[-1] + 1]
    if len(power) < steps:
        power = np.repeat(power, -(-steps // len(power)), axis=0)
    features = np.log(power @ mel_filterbank(bands, rate).T + 1e-6)
    return np.stack([run.mean(axis=0) for run in np.array_split(features, steps)]).astype(np.float32)


def spoken_digit_features(split: str, steps: int = 8, bands: int = 16,
                          root: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``[N, steps, bands]`` log-mel features and ``[N]`` digit labels of ``split``."""
    recordings = load_recordings(split, root)
    features = np.stack([log_mel_segments(r.audio, r.rate, steps, bands) for r in recordings])
    return features, np.array([r.digit for r in recordings])


def speakers(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The speakers' names found in the recordings' file names, sorted."""
    names = sorted({match[2] for path in locate(root).iterdir() if (match := FILE_PATTERN.match(path.name))})
    if not names:
        raise DataError(f"no recordings in {locate(root)}")
    return names


def held_out_speaker_features(test_speaker: str, steps: int = 8, bands: int = 16,
                              root: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, ...]:
    """``(train_x, train_y, test_x, test_y)`` with every recording of ``test_speaker`` held out for
    the test split and the other speakers' recordings (all takes) for training: a model then
    meets a voice it never heard, as a deployed keyword spotter does."""
    recordings = load_recordings("train", root) + load_recordings("test", root)
    speakers = sorted({r.speaker for r in recordings})
    if test_speaker not in speakers:
        raise InputError(f"unknown speaker {test_speaker!r}; the recordings hold {', '.join(speakers)}")
    parts = []
    for held_out in (False, True):
        chosen = [r for r in recordings if (r.speaker == test_speaker) == held_out]
        parts += [np.stack([log_mel_segments(r.audio, r.rate, steps, bands) for r in chosen]),
                  np.array([r.digit for r in chosen])]
    return tuple(parts)
