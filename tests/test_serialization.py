"""save/load: safetensors + JSON metadata, bit-identical reloads, nothing half-loaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mixprec
from mixprec import CheckpointError, Policy

POLICY = Policy([("0", "int8-static"), ("2", "w4"), ("3", "fp16"), ("5", "int8")], default="bf16")


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32), nn.LayerNorm(32),
                         nn.Linear(32, 8), nn.Linear(8, 8))


def quantized(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = build()
    mixprec.quantize(model, POLICY, calibration=[torch.randn(16, 64)])
    path = tmp_path / "model.safetensors"
    mixprec.save(model, path)
    return model, path


def test_reload_is_bit_identical(tmp_path: Path) -> None:
    model, path = quantized(tmp_path)
    fresh = build()
    report = mixprec.load(fresh, path)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))
    assert report.total_bytes == sum(t.nbytes for t in model.state_dict().values())
    assert type(fresh[0]).__name__ == "Int8StaticLinear" and report.layer("6").precision == "bf16"


def test_file_is_safetensors_with_json_metadata(tmp_path: Path) -> None:
    _, path = quantized(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["mixprec"])
        assert handle.get_tensor("2.weight_packed").dtype == torch.uint8
    assert meta["layers"]["0"] == "int8-static" and meta["layers"]["2"] == "w4g32"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def untouched(model: nn.Module) -> bool:
    reference = build()
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())) \
        and all(type(m) in (nn.Linear, nn.ReLU, nn.LayerNorm) for m in model)


def test_mismatched_architecture_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    _, path = quantized(tmp_path)
    other = build()
    other[5] = nn.Linear(32, 9)
    other[6] = nn.Linear(9, 8)
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError, match=r"tensor '5.weight': checkpoint has torch.int8 \(8, 32\)"):
        mixprec.load(other, path)
    assert all(torch.equal(snapshot[k], v) for k, v in other.state_dict().items())
    assert type(other[5]) is nn.Linear


def test_missing_layer_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    _, path = quantized(tmp_path)
    short = nn.Sequential(*list(build())[:4])
    with pytest.raises(CheckpointError, match="'5', which the model lacks"):
        mixprec.load(short, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    fresh = build()
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        mixprec.load(fresh, bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="no mixprec metadata"):
        mixprec.load(fresh, plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        mixprec.load(fresh, tmp_path / "nope.safetensors")
    assert untouched(fresh)


def test_bad_scales_are_refused(tmp_path: Path) -> None:
    model, path = quantized(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    tensors["5.weight_scale"][0] = -1.0
    save_file(tensors, str(path), metadata=metadata)
    fresh = build()
    with pytest.raises(CheckpointError, match="'5.weight_scale' holds scales that are not finite and positive"):
        mixprec.load(fresh, path)
    assert untouched(fresh)


def test_loading_into_a_quantized_model_is_refused(tmp_path: Path) -> None:
    model, path = quantized(tmp_path)
    with pytest.raises(CheckpointError, match="already quantized"):
        mixprec.load(model, path)


def test_tied_weights_are_saved_once(tmp_path: Path) -> None:
    def tied() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        model[1].weight = model[0].weight
        return model
    model = tied()
    path = tmp_path / "tied.safetensors"
    mixprec.save(model, path)
    fresh = tied()
    with torch.no_grad():
        fresh[0].weight.zero_()
    mixprec.load(fresh, path)
    assert torch.equal(fresh[1].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


def test_written_files_honour_the_umask(tmp_path: Path) -> None:
    import os

    from mixprec.io_utils import write_text_atomic

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        previous = os.umask(mask)
        try:
            write_text_atomic(tmp_path / f"f{mask}.txt", "x")
        finally:
            os.umask(previous)
        assert (tmp_path / f"f{mask}.txt").stat().st_mode & 0o777 == mode
