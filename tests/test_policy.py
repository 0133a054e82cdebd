"""Policies: ordered regex rules, explain(), TOML, and every bad-input error."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import mixprec
from mixprec import CalibrationError, Policy, PolicyError, quantize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.norm = nn.LayerNorm(64)
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(self.emb(ids))))).mean(1)


def test_first_matching_rule_wins_with_fullmatch() -> None:
    policy = Policy([("fc.", "int8"), ("emb", "w4")], default="bf16")
    plans = {p.name: (p.precision.name, p.rule) for p in policy.plan(Net())}
    assert plans == {"emb": ("w4", "emb"), "fc1": ("int8", "fc."), "fc2": ("int8", "fc.")}
    partial = Policy([("fc", "int8")], default="fp16", allow_unused=True)
    assert {p.name: p.precision.name for p in partial.plan(Net())}["fc1"] == "fp16"  # no search(), fullmatch


def test_explain_lists_every_layer_with_exact_bytes() -> None:
    policy = Policy([("fc1", "int8"), ("fc2", "w4g32"), ("emb", "w4")])
    report = policy.explain(Net())
    rows = {row.name: row for row in report.layers}
    assert rows["norm"].precision == "fp32" and rows["norm"].rule == "-"
    assert rows["fc1"].bytes_after == 96 * 64 + 4 * 96 + 4 * 96
    assert rows["fc2"].bytes_after == 10 * 96 // 2 + 2 * 10 * 3 + 4 * 10
    assert rows["emb"].bytes_after == 100 * (32 + 3)
    assert rows["fc1"].kernel.startswith("int8 GEMM")
    model = Net()
    actual = mixprec.quantize(model, policy)
    assert actual.total_bytes == report.total_bytes
    assert actual.total_bytes == sum(t.nbytes for t in model.state_dict().values())
    assert "fc1" in str(report) and "int8" in report.to_csv()


def test_toml_round_trip(tmp_path: Path) -> None:
    policy = Policy([(r"encoder\.layer\.\d+\.attention\..*", "fp16"), ("fc'x", "w4g128")], default="int8")
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    assert Policy.from_toml(path) == policy


def test_unknown_precision_lists_the_valid_names() -> None:
    with pytest.raises(PolicyError, match="unknown precision 'int3'.*fp32, bf16, fp16, int8, int8-static"):
        Policy([("fc1", "int3")])
    with pytest.raises(PolicyError, match="unknown precision"):
        Policy(default="float8")


def test_invalid_regex_names_the_rule() -> None:
    with pytest.raises(PolicyError, match=r"rule 1 has an invalid regular expression 'fc\['"):
        Policy([("fc1", "int8"), ("fc[", "int8")])


def test_rule_matching_no_module_is_refused_unless_allowed() -> None:
    policy = Policy([("fc1", "int8"), ("decoder.*", "fp16")])
    with pytest.raises(PolicyError, match="(?s)'decoder.\\*' -> 'fp16': it matches no module.*fc1"):
        policy.plan(Net())
    Policy([("fc1", "int8"), ("decoder.*", "fp16")], allow_unused=True).plan(Net())
    with pytest.raises(PolicyError, match="does not quantize.*LayerNorm"):
        Policy([("norm", "int8")]).plan(Net())
    with pytest.raises(PolicyError, match="taken by an earlier rule"):
        Policy([("fc.", "int8"), ("fc2", "fp16")]).plan(Net())


def test_precision_not_valid_for_the_module_type() -> None:
    expected = "(?s)'int8-static' is not valid for layer 'emb' \\(Embedding\\).*fp32, bf16, fp16, int8, w4, w8gN"
    with pytest.raises(PolicyError, match=expected):
        Policy([("emb", "int8-static")]).plan(Net())
    with pytest.raises(PolicyError, match="'w8' is not valid for layer 'emb'.*int8 weight-only tables come in groups"):
        Policy([("emb", "w8")]).plan(Net())


def test_group_size_must_divide_the_input_features() -> None:
    expected = "group size 28 does not divide the 96 input features of layer 'fc2'.*2, 4, 6, 8"
    with pytest.raises(PolicyError, match=expected):
        Policy([("fc2", "w4g28")]).plan(Net())


def test_static_precision_needs_calibration() -> None:
    model = Net()
    with pytest.raises(CalibrationError, match="need calibration data"):
        mixprec.quantize(model, Policy([("fc1", "int8-static")]))
    assert isinstance(model.fc1, nn.Linear)  # nothing was changed


def test_calibration_with_nan_or_nothing_is_refused() -> None:
    policy = Policy([("fc.", "int8-static")])
    with pytest.raises(CalibrationError, match="batch 1 holds NaN"):
        batches = [torch.zeros(2, 3, dtype=torch.long), (torch.full((2, 2), float("nan")),)]
        mixprec.quantize(Net(), policy, calibration=batches)
    with pytest.raises(CalibrationError, match="empty"):
        mixprec.quantize(Net(), policy, calibration=[])


def test_static_calibration_observes_each_layer_input() -> None:
    torch.manual_seed(0)
    model = Net()
    ids = torch.randint(0, 100, (16, 12))
    ref = model(ids).detach()
    report = mixprec.quantize(model, Policy([("fc.", "int8-static")]), calibration=[ids[:8], ids[8:]])
    assert report.layer("fc1").precision == "int8-static"
    err = (model(ids) - ref).abs().max() / ref.abs().max()
    assert err < 0.012  # measured 0.0061 (seed 0)


def test_quantize_refuses_bad_arguments() -> None:
    with pytest.raises(PolicyError, match="mixprec.Policy or a precision name"):
        mixprec.quantize(Net(), 42)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="torch.nn.Module"):
        Policy().plan("not a model")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="wrap it first"):
        mixprec.quantize(nn.Linear(4, 4), "int8")
    with pytest.raises(CalibrationError, match="unknown observer"):
        mixprec.quantize(Net(), "int8", observer="kl")


def test_multihead_attention_projections_are_left_alone() -> None:
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 4))
    plans = Policy(default="int8").plan(model)
    assert [p.name for p in plans] == ["1"]


def test_int8_gemm_refuses_reductions_that_could_overflow_int32() -> None:
    from mixprec.kernels import MAX_REDUCTION

    model = nn.Sequential(nn.Linear(MAX_REDUCTION + 2, 1))
    with pytest.raises(PolicyError, match="131074 input features.*overflow-free only up to 131072: use w8"):
        Policy(default="int8").plan(model)
    Policy(default="w8").plan(model)
    # int8-asym multiplies uint8 differences (up to 255) by int8 weights: a shorter bound
    wide = nn.Sequential(nn.Linear(66312, 1))
    with pytest.raises(PolicyError, match="66312 input features.*'int8-asym'.*overflow-free only up to 66311"):
        Policy(default="int8-asym").plan(wide)
    Policy(default="int8").plan(wide)


def test_report_writes_csv_and_json_atomically(tmp_path: Path) -> None:
    import json

    report = mixprec.quantize(Net(), Policy([("fc.", "int8")]))
    report.to_json(tmp_path / "r.json")
    report.to_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["total_bytes"] == report.total_bytes and data["layers"][2]["name"] == "fc1"
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("name,module_type,precision,kernel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]


def test_quantize_frees_each_float_layer_before_building_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    quantize_module = sys.modules["mixprec.quantize"]
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    refs = {name: weakref.ref(model.get_submodule(name)) for name in ("0", "2", "4")}
    alive_at_build: list[list[str]] = []
    real_build = quantize_module.build

    def watching_build(module, *args):  # noqa: ANN001, ANN202
        gc.collect()
        alive_at_build.append([name for name, ref in refs.items() if ref() is not None])
        return real_build(module, *args)

    monkeypatch.setattr(quantize_module, "build", watching_build)
    quantize(model, Policy(default="int8", rules=[("2", "bf16")]))
    assert alive_at_build == [["0", "2", "4"], ["2", "4"], ["4"]]


def test_slow_paths_warn_once_per_reason_naming_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    from mixprec.kernels import native

    monkeypatch.setattr(native, "load_error", lambda: "forced off")
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(7)))
    with pytest.warns(RuntimeWarning) as caught:
        quantize(model, Policy(default="int8", rules=[("6", "w4g8")]))
    messages = sorted(str(w.message) for w in caught if "slow path" in str(w.message))
    assert messages == [
        "mixprec: 6 int8 layers ('0', '1', '2', '3', '4' and 1 more) run a slow path: native kernels unavailable "
        "(forced off); running the PyTorch-op path",
        "mixprec: layer '6' (w4g8) runs a slow path: native kernels unavailable (forced off); "
        "running the PyTorch-op path",
    ]
