"""torch.compile of quantized models: no graph break caused by mixprec, the eager model's bits."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mixprec
from mixprec.kernels import fake_ops, native

LINEAR_PRECISIONS = ["int8", "int8-static", "w8", "w8g32", "w4", "w4a8", "bf16", "fp16"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


@pytest.mark.parametrize("precision", LINEAR_PRECISIONS)
def test_compiled_quantized_model_has_no_graph_break_and_the_eager_bits(precision: str) -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    torch.manual_seed(0)
    model = TinyModel().eval()
    ids = torch.randint(0, 50, (3, 5))
    embedding = {"int8-static": "int8", "w4a8": "w4", "w8": "w8g32"}.get(precision, precision)
    policy = mixprec.Policy([("embed", embedding)], default=precision)
    calibration = [torch.randint(0, 50, (4, 5))] if precision == "int8-static" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16's emulated-GEMM note
        mixprec.quantize(model, policy, calibration=calibration)
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = model(ids), torch.compile(model)(ids)
    assert torch.equal(eager, compiled)


def test_every_native_operator_a_quantized_linear_calls_has_a_fake() -> None:
    if not native.available():
        pytest.skip(f"native kernels: {native.load_error()}")
    covered = set(fake_ops.register())
    for name in ("quantize_rows_s8", "quantize_rows_u8", "quantize_rows_static_s8", "quantize_samples_u8",
                 "int8_linear_dynamic", "w8_linear_rows", "w8g_linear_rows", "w4_linear_rows", "w4a8_linear",
                 "rescale_rows_cols", "rescale_rows_cols_", "tflite_conv2d"):
        assert name in covered
        assert torch._library.simple_registry.singleton.find(f"mixprec::{name}").fake_impl.kernel is not None
