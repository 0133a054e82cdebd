"""The two CNNs of the CNN study, in the MLPerf Tiny shapes, with their data and training.

- :class:`ResNet8`: the MLPerf Tiny image-classification ResNet (a 3x3 stem, three residual
  stacks of 16, 32 and 64 channels, strides 1, 2, 2, a 1x1 projection where the shape changes,
  global average pooling, one Linear), here on 28x28x1 Fashion-MNIST images in [0, 1].
- :class:`DSCNN`: the MLPerf Tiny keyword spotter (a 10x4 stride-2 convolution, then four
  depthwise-separable blocks of a 3x3 depthwise and a 1x1 pointwise convolution, each followed
  by BatchNorm and ReLU, 64 channels, global average pooling, one Linear), on 49x10 log-mel
  grids of the Free Spoken Digit Dataset (10 words), standardized (:func:`spoken_digits_task`).

Both are trained here in float32: AdamW (weight decay 1e-4), a one-cycle learning rate,
cross-entropy, shuffled mini-batches, seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

from mixprec.datasets.fashion_mnist import load_split
from mixprec.datasets.spoken_digits import held_out_speaker_features, spoken_digit_features
from mixprec.errors import InputError


def _conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, groups: int = 1,
             padding: int | tuple[int, int] | None = None) -> list[nn.Module]:
    if padding is None:
        padding = kernel // 2 if isinstance(kernel, int) else (kernel[0] // 2, kernel[1] // 2)
    return [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class ResidualBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a 1x1 convolution
    (with its BatchNorm) where the stride or the width changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride, padding=0))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet8(nn.Module):
    """MLPerf Tiny ResNet-8 (see module docstring); 78k parameters for 1 input channel."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(channels, 16, 3), nn.ReLU())
        self.stack1 = ResidualBlock(16, 16, 1)
        self.stack2 = ResidualBlock(16, 32, 2)
        self.stack3 = ResidualBlock(32, 64, 2)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stack3(self.stack2(self.stack1(self.stem(x))))
        return self.head(y.mean((2, 3)))


class DSCNN(nn.Module):
    """MLPerf Tiny DS-CNN (see module docstring); input ``[N, 1, 49, 10]``."""

    def __init__(self, classes: int = 10, width: int = 64, blocks: int = 4) -> None:
        super().__init__()
        layers = [*_conv_bn(1, width, (10, 4), 2, padding=(5, 1)), nn.ReLU()]
        for _ in range(blocks):
            layers += [*_conv_bn(width, width, 3, groups=width), nn.ReLU(), *_conv_bn(width, width, 1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


@dataclass(frozen=True)
class Task:
    """A model's data: float32 inputs and int64 labels of both splits."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def fashion_mnist_task(data: str | None = None) -> Task:
    """Fashion-MNIST as ``[N, 1, 28, 28]`` float32 in [0, 1]."""
    splits = [load_split(split, data) for split in ("train", "test")]
    x = [torch.from_numpy(s.images.astype(np.float32) / 255.0).unsqueeze(1) for s in splits]
    y = [torch.from_numpy(s.labels.astype(np.int64)) for s in splits]
    return Task("Fashion-MNIST", x[0], y[0], x[1], y[1])


#: How :func:`spoken_digits_task` standardizes its grids.
NORMALIZATIONS = ("dataset", "recording")


def spoken_digits_task(data: str | None = None, test_speaker: str | None = None,
                       normalization: str = "dataset") -> Task:
    """Spoken digits as ``[N, 1, 49, 10]`` standardized log-mel grids, float32.

    ``normalization``: ``"dataset"`` subtracts the training split's mean and divides by its
    standard deviation (one of each for the whole grid); ``"recording"`` uses each grid's own
    mean and standard deviation (population, over its 490 values; at least 1e-6), which removes
    a recording's level and spread: the front end then ignores loudness, and a model trained on
    it generalizes better to an unheard voice. ``test_speaker`` holds that speaker's recordings
    out as the test set (the others train); None takes the dataset's own split (takes 0-4 of
    every speaker for testing)."""
    if normalization not in NORMALIZATIONS:
        raise InputError(f"unknown normalization {normalization!r}; choose {', '.join(NORMALIZATIONS)}")
    if test_speaker is None:
        train_x, train_y = spoken_digit_features("train", 49, 10, data)
        test_x, test_y = spoken_digit_features("test", 49, 10, data)
    else:
        train_x, train_y, test_x, test_y = held_out_speaker_features(test_speaker, 49, 10, data)
    if normalization == "dataset":
        mean, std = float(train_x.mean()), float(train_x.std())
        grids = [(f - mean) / std for f in (train_x, test_x)]
    else:
        grids = [(f - f.mean((1, 2), keepdims=True)) / np.maximum(f.std((1, 2), keepdims=True), 1e-6)
                 for f in (train_x, test_x)]
    x = [torch.from_numpy(g.astype(np.float32)).unsqueeze(1) for g in grids]
    name = "spoken digits" + (f" (speaker {test_speaker} held out)" if test_speaker else "")
    if normalization == "recording":
        name += ", each recording standardized"
    return Task(name, x[0], torch.from_numpy(train_y.astype(np.int64)), x[1], torch.from_numpy(test_y.astype(np.int64)))


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` with PyTorch's generator seeded first (its seed at start-up differs between
    processes), so a model's initial weights are the same in every run."""
    torch.manual_seed(seed)
    return make()


def train(model: nn.Module, task: Task, epochs: int, seed: int, batch_size: int = 64, lr: float = 3e-3) -> nn.Module:
    """Train ``model`` in float32 (see module docstring) and return it in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps = (len(task.x_train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    model.train()
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"training {type(model).__name__} on {task.name}", total=epochs * steps)
        for _ in range(epochs):
            order = torch.randperm(len(task.x_train), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                loss = F.cross_entropy(model(task.x_train[index]), task.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.advance(bar)
    return model.eval()


@torch.no_grad()
def per_sample_scores(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample top-1 correctness (bool ``[N]``) and cross-entropy in nats (float64 ``[N]``)."""
    hits, losses = [], []
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size]).double()
        hits.append(logits.argmax(1) == y[i:i + batch_size])
        losses.append(F.cross_entropy(logits, y[i:i + batch_size], reduction="none"))
    return torch.cat(hits).numpy(), torch.cat(losses).numpy()
