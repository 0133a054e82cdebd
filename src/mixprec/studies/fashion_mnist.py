"""The Fashion-MNIST precision study: a 784-64-10 ReLU MLP in every precision.

Trains the MLP in float32 (seeded), then for each policy quantizes a copy (one after
quantization-aware fine-tuning through its policy) and measures
test accuracy, exact bytes, bytes allocated by a batch-32 forward pass, throughput at
batch 256 and latency at batch 1 (interleaved medians, one process).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn

from mixprec.bench.memory import bytes_allocated
from mixprec.datasets.fashion_mnist import load_split
from mixprec.policy import Policy
from mixprec.qat import prepare_qat
from mixprec.quantize import quantize
from mixprec.report.plots import accuracy_vs_bytes
from mixprec.report.results import print_table, write_csv, write_json
from mixprec.serialization import save
from mixprec.studies.common import weight_bytes
from mixprec.timing import interleaved_medians

COLUMNS = ("precision", "accuracy", "weight_bytes", "total_bytes", "activation_bytes_b32",
           "throughput_sps", "latency_ms_b1")


class MLP(nn.Module):
    """784-64-10 with ReLU, as in the reference project (50,890 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


@dataclass(frozen=True)
class StudyRow:
    """One configuration of the study: a policy and how integer weights are rounded."""

    policy: Policy
    weight_rounding: str = "nearest"
    #: Epochs of quantization-aware training (mixprec.prepare_qat) on the float model before quantizing.
    qat_epochs: int = 0


#: Quantization-aware fine-tuning of the study's QAT row: epochs and the one-cycle peak learning rate.
QAT_EPOCHS = 2
QAT_LR = 3e-4


def study_policies() -> dict[str, StudyRow]:
    """Label -> configuration. 784 is not a multiple of 32, so ``w4`` uses g28 on fc1
    (784 = 28 x 28), the nearest group size that divides it."""
    uniform = ["fp32", "bf16", "fp16", "int8", "int8-static", "int8-tensor", "w8", "w4g16"]
    rows = {name: StudyRow(Policy(default=name)) for name in uniform}
    w4 = Policy([("fc1", "w4g28")], default="w4")
    rows["w4 (fc1 g28, fc2 g32)"] = StudyRow(w4)
    rows["w4g16 gptq"] = StudyRow(Policy(default="w4g16"), "gptq")
    rows["w4 (fc1 g28, fc2 g32) gptq"] = StudyRow(w4, "gptq")
    rows["w4 (fc1 g28, fc2 g32), QAT 2 epochs"] = StudyRow(w4, qat_epochs=QAT_EPOCHS)
    rows["mixed (fc1 int8, fc2 fp16)"] = StudyRow(Policy([("fc1", "int8"), ("fc2", "fp16")]))
    return rows


def to_inputs(images: np.ndarray) -> Tensor:
    """uint8 images -> float32 ``[N, 784]`` in [0, 1]."""
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)


def train(x: Tensor, y: Tensor, epochs: int, seed: int, batch_size: int = 128, lr: float = 2e-3) -> MLP:
    """A float32 :class:`MLP` trained by :func:`fit`; returned in eval mode."""
    torch.manual_seed(seed)
    return fit(MLP(), x, y, epochs, seed, batch_size, lr, "training fp32 MLP")


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, batch_size: int = 128, lr: float = 2e-3,
        label: str = "training") -> nn.Module:
    """AdamW (weight decay 1e-4) with a one-cycle learning-rate schedule peaking at ``lr``,
    cross-entropy, shuffled mini-batches; deterministic for a given seed. Trains ``model`` in
    place (a float model, or one prepared by :func:`mixprec.prepare_qat`) and returns it in
    eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps = (len(x) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    with Progress() as progress:
        task = progress.add_task(label, total=epochs * steps)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                index = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.advance(task)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


@dataclass(frozen=True)
class StudyConfig:
    data: str | None = None
    out: str = "runs/fashion-mnist"
    epochs: int = 20
    seed: int = 0
    rounds: int = 7
    calibration_samples: int = 2048


def run(config: StudyConfig, console: Console | None = None) -> list[dict[str, object]]:
    """Run the whole study; write results.csv/.json and accuracy_vs_bytes.png to ``out``."""
    console = console or Console(width=160)
    if config.epochs < 1 or config.rounds < 1 or config.calibration_samples < 1:
        raise ValueError("epochs, rounds and calibration_samples must all be >= 1")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train_split, test_split = load_split("train", config.data), load_split("test", config.data)
    x_train, y_train = to_inputs(train_split.images), torch.from_numpy(train_split.labels.astype(np.int64))
    x_test, y_test = to_inputs(test_split.images), torch.from_numpy(test_split.labels.astype(np.int64))
    fp32 = train(x_train, y_train, config.epochs, config.seed)
    save(fp32, out / "mlp_fp32.safetensors")
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed + 1))
    calibration = list(x_train[pick[: config.calibration_samples]].split(256))

    models: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, object]] = {}
    batch32, batch256, batch1 = x_test[:32], x_test[:256], x_test[:1]
    for label, row in study_policies().items():
        model = copy.deepcopy(fp32)
        if row.qat_epochs:
            prepare_qat(model, row.policy)
            fit(model, x_train, y_train, row.qat_epochs, config.seed + 2, lr=QAT_LR, label=f"QAT: {label}")
        report = quantize(model, row.policy, calibration=calibration, weight_rounding=row.weight_rounding)
        models[label] = model
        rows[label] = {
            "precision": label,
            "accuracy": round(accuracy(model, x_test, y_test), 2),
            "weight_bytes": weight_bytes(model),
            "total_bytes": report.total_bytes,
            "activation_bytes_b32": bytes_allocated(lambda m=model: m(batch32)),
        }
    with torch.no_grad():
        throughput = interleaved_medians({k: (lambda m=m: m(batch256)) for k, m in models.items()}, config.rounds)
        latency = interleaved_medians({k: (lambda m=m: m(batch1)) for k, m in models.items()}, config.rounds)
    for label, row in rows.items():
        row["throughput_sps"] = round(len(batch256) / throughput[label], 1)
        row["latency_ms_b1"] = round(latency[label] * 1e3, 4)
    results = list(rows.values())
    print_table(f"Fashion-MNIST 784-64-10 MLP ({config.epochs} epochs, seed {config.seed}, "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads)", results, COLUMNS, console)
    write_csv(out / "results.csv", results, COLUMNS)
    write_json(out / "results.json", {"config": config.__dict__, "torch": torch.__version__,
                                       "threads": torch.get_num_threads(), "results": results})
    accuracy_vs_bytes(out / "accuracy_vs_bytes.png", [r["precision"] for r in results],  # type: ignore[misc]
                      [r["accuracy"] for r in results], [r["total_bytes"] for r in results],  # type: ignore[misc]
                      "Fashion-MNIST MLP: accuracy vs bytes")
    console.print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'accuracy_vs_bytes.png'}")
    return results
