"""cnn_graph_traced: float PyTorch CNNs of any wiring (residual blocks) -> integer graphs that are
byte-identical to LiteRT, the same as cnn_graph_from's on a chain, and bad input refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_integer_fc import litert_outputs
from torch import nn

import mixprec
from mixprec import InputError
from mixprec.integer import export_tflite
from mixprec.integer.build.cnn import cnn_graph_from
from mixprec.integer.build.mix import graph_input
from mixprec.integer.build.traced import cnn_graph_traced
from mixprec.studies.cnn_models import DSCNN, ResNet8


def _folded(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics away from the identity, folded."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    mixprec.fold_batchnorm(model.eval())
    return model


@pytest.mark.parametrize("activations", ["int8", "int16"])
def test_a_resnet8_converts_to_a_graph_byte_identical_to_litert(activations: str, tmp_path: Path) -> None:
    """The MLPerf Tiny ResNet-8 (identity and projection shortcuts, ReLU fused into ADD, a global
    mean): every residual ADD in the graph, LiteRT's reference kernels give the same bytes, and the
    dequantized logits stay near the float model's (measured here: 0.53% of the logits' range in
    int8, 0.18% in 16x8, on these random weights; the bounds are twice that)."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    torch.manual_seed(0)
    model = _folded(ResNet8())
    graph = cnn_graph_traced(model, torch.rand(256, 1, 28, 28), activations=activations)
    opcodes = [node.opcode for node in graph.nodes]
    assert opcodes.count("ADD") == 3 and opcodes.count("CONV_2D") == 9
    assert all(node.activation == "relu" for node in graph.nodes if node.opcode == "ADD")
    x = torch.rand(64, 1, 28, 28)
    codes = graph_input(graph, x)
    path = tmp_path / "resnet8.tflite"
    export_tflite(graph, path)
    assert np.array_equal(graph(codes), litert_outputs(path, codes))
    with torch.no_grad():
        reference = model(x).numpy()
    error = np.abs(graph.output_quant.values_of(graph(codes)) - reference).max() / np.ptp(reference)
    assert error < (0.011 if activations == "int8" else 0.004), error


def test_a_chain_converts_as_cnn_graph_from_converts_it() -> None:
    """On the DS-CNN (a chain: ``features``, a mean, a Linear) the traced graph has the chain
    builder's operators and gives its codes."""
    torch.manual_seed(1)
    model = _folded(DSCNN(width=16, blocks=2))
    calibration = torch.randn(64, 1, 49, 10)
    traced = cnn_graph_traced(model, calibration)
    chain = cnn_graph_from([*model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head], calibration)
    assert [node.opcode for node in traced.nodes] == [node.opcode for node in chain.nodes]
    codes = graph_input(chain, torch.randn(200, 1, 49, 10))
    assert np.array_equal(traced(codes), chain(codes))


class _Functional(nn.Module):
    """F.relu after a conv, AdaptiveAvgPool2d + torch.flatten, a Linear with a fused ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1)))


def test_functional_relus_adaptive_pooling_and_flatten_convert() -> None:
    torch.manual_seed(2)
    model = _Functional().eval()
    graph = cnn_graph_traced(model, torch.randn(32, 2, 6, 6))
    assert [node.opcode for node in graph.nodes] == ["CONV_2D", "MEAN", "FULLY_CONNECTED"]
    assert graph.nodes[0].activation == "relu" and graph.nodes[2].activation == "relu6"


class _TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) + y


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


class _Branching(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.relu() if x.sum() > 0 else x


def test_what_does_not_convert_is_refused_by_name() -> None:
    torch.manual_seed(3)
    x = torch.randn(8, 1, 6, 6)
    with pytest.raises(InputError, match="fold the BatchNorms first"):
        cnn_graph_traced(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval(), x)
    with pytest.raises(InputError, match="a ReLU converts only as the fused activation"):
        cnn_graph_traced(_TwoReaders(), x)
    with pytest.raises(InputError, match="only equal shapes convert"):
        cnn_graph_traced(_Broadcast(), x)
    with pytest.raises(InputError, match="torch.fx cannot trace _Branching"):
        cnn_graph_traced(_Branching(), x)
    with pytest.raises(InputError, match="would order features as NHWC"):
        cnn_graph_traced(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 2)), x)
    with pytest.raises(InputError, match="does not convert LayerNorm"):
        cnn_graph_traced(nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm(4)), x)
    with pytest.raises(InputError, match="only a mean over height and width"):
        cnn_graph_traced(_MeanOverChannels(), x)
    with pytest.raises(InputError, match="calibration must be a float NCHW tensor"):
        cnn_graph_traced(nn.Conv2d(1, 2, 3), x[0])
    with pytest.raises(InputError, match="activations must be 'int8' or 'int16'"):
        cnn_graph_traced(nn.Conv2d(1, 2, 3), x, activations="int4")
    with pytest.raises(InputError, match="takes a torch.nn.Module"):
        cnn_graph_traced("model", x)  # type: ignore[arg-type]


class _MeanOverChannels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)
