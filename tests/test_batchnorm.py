"""BatchNorm folding: the arithmetic, which pairs fold (traced graphs and nn.Sequential), the
report, save/load, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mixprec
from mixprec import CheckpointError, PolicyError
from mixprec.batchnorm import Fold, find_folds, folded_conv


def _randomize(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.3, 3)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-1, 1)
    return model.eval()


class Block(nn.Module):
    """A residual block: conv1 -> bn1 folds; conv2's output also feeds the residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        c = self.conv2(y)
        return self.bn2(c) + c


class Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it, nn.Sequential still tells."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), nn.ReLU())
        self.tail = nn.Conv1d(6, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.tail(y) if bool(y.sum() > 0) else y


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), (4, 3, 9, 9)),
    (nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8, affine=False), (4, 8, 9, 9)),
    (nn.Conv1d(4, 6, 5, padding=2), nn.BatchNorm1d(6), (4, 4, 20)),
])
def test_folded_convolution_equals_the_pair(conv: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    _randomize(bn)
    x = torch.randn(shape)
    with torch.no_grad():
        pair = bn(conv(x)).double()
        folded = folded_conv(conv, bn)(x).double()
    assert folded_conv(conv, bn).bias is not None
    # the fold changes only float32 rounding: measured 1.1e-7 to 2.2e-7 of the output's largest value
    assert float((folded - pair).abs().max() / pair.abs().max()) < 5e-7


def test_traced_graph_folds_only_where_the_conv_output_has_one_reader() -> None:
    search = find_folds(Block())
    assert search.folds == (Fold("conv1", "bn1"),)
    assert "read elsewhere too" in search.refused[Fold("conv2", "bn2")]


def test_untraceable_models_fold_inside_sequential() -> None:
    search = find_folds(Untraceable())
    assert search.folds == (Fold("stem.0", "stem.1"),)


def test_shared_batchnorm_and_batch_statistics_are_not_folded() -> None:
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    assert find_folds(model).folds == ()
    assert all("more than one name" in why for why in find_folds(model).refused.values())
    batch_stats = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert "tracks no running statistics" in find_folds(batch_stats).refused[Fold("0", "1")]


def test_quantize_folds_reports_and_equals_quantizing_the_folded_conv() -> None:
    torch.manual_seed(0)
    model = _randomize(Block())
    x = torch.randn(2, 8, 6, 6)
    expected = folded_conv(model.conv1, model.bn1)
    report = mixprec.quantize(model, mixprec.Policy([("conv1", "int8")], default="fp32"))
    rows = {row.name: row for row in report.layers}
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.BatchNorm2d)
    assert rows["bn1"].precision == "folded" and rows["bn1"].kernel == "folded into 'conv1'"
    assert rows["bn1"].bytes_after == 0 and "BatchNorm 'bn1' folded in" in rows["conv1"].kernel
    assert rows["bn2"].kernel == "unchanged"  # conv2 stays float32: nothing to fold for
    reference = mixprec.nn.Int8Conv.from_float(expected)
    assert torch.equal(model.conv1(x), reference(x))
    assert model.conv1.bias is not None


def test_quantize_says_why_a_batchnorm_after_a_quantized_conv_stays() -> None:
    model = _randomize(Block())
    report = mixprec.quantize(model, "w8")
    row = {row.name: row for row in report.layers}["bn2"]
    assert row.precision == "fp32" and row.kernel.startswith("float32, not folded: the output of 'conv2'")


def test_fold_batchnorm_false_keeps_them_apart() -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    mixprec.quantize(model, "int8", fold_batchnorm=False)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].folded_batchnorm is None
    with pytest.raises(PolicyError, match="fold_batchnorm must be True or False"):
        mixprec.quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), "int8", fold_batchnorm="yes")


def test_save_and_load_a_folded_model(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(3)
        return _randomize(Untraceable())

    x = torch.randn(2, 4, 12)
    model = make()
    mixprec.quantize(model, "int8-static", calibration=[x])
    y = model(x)
    path = tmp_path / "folded.safetensors"
    mixprec.save(model, path)
    loaded = make()
    mixprec.load(loaded, path)
    assert isinstance(loaded.stem[1], nn.Identity) and loaded.stem[0].folded_batchnorm == "stem.1"
    assert torch.equal(loaded(x), y)

    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = json.loads(handle.metadata()["mixprec"]), {k: handle.get_tensor(k) for k in handle.keys()}
    meta["folded"] = {"tail": "stem.0"}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"mixprec": json.dumps(meta)})
    fresh = make()
    with pytest.raises(CheckpointError, match="folded BatchNorm 'tail' into 'stem.0', but the model has Conv1d"):
        mixprec.load(fresh, bad)
    assert isinstance(fresh.stem[1], nn.BatchNorm1d)  # left untouched


def _small_cnn() -> nn.Module:
    torch.manual_seed(5)
    return _randomize(nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)))


def test_fold_batchnorm_in_place_keeps_the_float_function() -> None:
    model = _small_cnn()
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        before = model(x)
        search = mixprec.fold_batchnorm(model)
        after = model(x)
    assert search.folds == (Fold("0", "1"), Fold("3", "4"))
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    assert float((after - before).abs().max() / before.abs().max()) < 5e-7  # float32 rounding only
    with pytest.raises(PolicyError, match="fold_batchnorm takes a torch.nn.Module"):
        mixprec.fold_batchnorm("model")


def test_measurements_on_unfolded_pairs_warn_and_folded_ones_search_to_exact_bytes() -> None:
    from mixprec.analysis.latency import measure_latency
    from mixprec.analysis.search import search, uniform_bytes
    from mixprec.analysis.sensitivity import sensitivity

    x = torch.randn(8, 1, 12, 12)
    with pytest.warns(RuntimeWarning, match=r"sensitivity sees 2 BatchNorms \('1', '4'\).*fold_batchnorm"):
        sensitivity(_small_cnn(), [x], ["int8"], progress=False)
    model = _small_cnn()
    mixprec.fold_batchnorm(model)
    table = sensitivity(model, [x], ["int8", "w4", "bf16"], progress=False)
    assert {row.layer for row in table.rows} == {"0", "3", "6", "10"}
    assert all(table.cost("3", "w4") > table.cost("3", p) for p in ("int8", "bf16"))
    latency = measure_latency(model, x, ["int8", "w4"], rounds=1, min_seconds=0.01, progress=False)
    assert {row.layer for row in latency.rows} >= {"0", "3", "6"}
    budget = int(0.8 * uniform_bytes(model, "int8"))
    result = search(model, table, budget_bytes=budget)
    report = mixprec.quantize(model, result.policy)
    assert report.total_bytes == result.predicted_bytes <= budget


class ReluChains(nn.Module):
    """conv1 -> bn1 -> relu1 fuses; conv2 -> relu2 fuses; relu3 reads conv3, whose output the
    sum reads too, so it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(8, 8, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        z = self.conv3(y)
        return self.relu3(z) + z


def test_relus_after_int8_convolutions_run_in_their_epilogue(tmp_path: Path) -> None:
    from mixprec.batchnorm import ReluFusion

    def make() -> nn.Module:
        torch.manual_seed(4)
        return _randomize(ReluChains())

    model = make()
    assert find_folds(model).relus == (ReluFusion("conv1", "relu1"), ReluFusion("conv2", "relu2"))
    x = torch.randn(2, 3, 9, 9)
    report = mixprec.quantize(model, "int8-static", calibration=[x])
    assert isinstance(model.relu1, nn.Identity) and isinstance(model.relu2, nn.Identity)
    assert isinstance(model.relu3, nn.ReLU) and model.conv3.fused_relu is None
    kernels = {row.name: row.kernel for row in report.layers}
    assert "ReLU 'relu1' fused" in kernels["conv1"] and "BatchNorm 'bn1' folded in" in kernels["conv1"]
    y = model(x)
    from mixprec.nn.linear_int8 import STATIC_ACTIVATION

    fresh = make()
    qp = mixprec.formats.QParams(STATIC_ACTIVATION, model.conv1.input_scale.clone(),
                                 model.conv1.input_zero_point.clone())
    reference = mixprec.nn.Int8StaticConv.from_float(folded_conv(fresh.conv1, fresh.bn1), qp)
    assert torch.equal(model.conv1(x), reference(x).relu())
    mixprec.save(model, tmp_path / "fused.safetensors")
    loaded = make()
    mixprec.load(loaded, tmp_path / "fused.safetensors")
    assert isinstance(loaded.relu2, nn.Identity) and loaded.conv2.fused_relu == "relu2"
    assert torch.equal(loaded(x), y)
    w8 = make()
    mixprec.quantize(w8, "w8")
    assert isinstance(w8.relu1, nn.ReLU)  # only int8 convolutions have the epilogue


def test_relus_fuse_after_batchnorms_folded_beforehand() -> None:
    from mixprec.batchnorm import ReluFusion

    for model in (_small_cnn(), ReluChains()):  # nn.Sequential, and a traced module
        mixprec.fold_batchnorm(model)
        relus = find_folds(model).relus
        assert relus and relus[0].conv in ("0", "conv1")
    assert find_folds(_small_cnn()).relus[0] == ReluFusion("0", "2")
    model = _small_cnn()
    mixprec.fold_batchnorm(model)
    mixprec.quantize(model, "int8")
    assert isinstance(model[2], nn.Identity) and model[0].fused_relu == "2"


def test_explain_shows_folds_and_fusions_with_the_bytes_quantize_gives() -> None:
    policy = mixprec.Policy([("conv1|conv2", "int8")], default="w8")
    explained = policy.explain(_randomize(ReluChains()))
    rows = {row.name: row for row in explained.layers}
    assert rows["bn1"].precision == "folded" and rows["bn1"].bytes_after == 0
    assert "BatchNorm 'bn1' folded in" in rows["conv1"].kernel and "ReLU 'relu1' fused" in rows["conv1"].kernel
    model = _randomize(ReluChains())
    report = mixprec.quantize(model, policy)
    assert explained.total_bytes == report.total_bytes
    assert ([(r.name, r.precision, r.bytes_after) for r in explained.layers]
            == [(r.name, r.precision, r.bytes_after) for r in report.layers])
    unfolded = policy.explain(_randomize(ReluChains()), fold_batchnorm=False)
    assert {row.name: row.precision for row in unfolded.layers}["bn1"] == "fp32"
    kept = {row.name: row.kernel for row in mixprec.Policy(default="w8").explain(_randomize(Block())).layers}
    assert kept["bn2"].startswith("float32, not folded: the output of 'conv2'")


def test_quantize_frees_each_folded_float_convolution_before_the_next() -> None:
    """The fx trace that finds the folds shares the model's layers inside reference cycles; unless
    it is collected, every float layer outlives its quantized replacement (three layers' worth of
    extra memory, measured in benchmarks/cnn_memory.py). Each original must die with its reference."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8)).eval()
    originals = [weakref.ref(model[0]), weakref.ref(model[3])]
    seen = []
    gc.disable()  # nothing may rely on the cyclic collector running by chance
    try:
        mixprec.quantize(model, mixprec.Policy(default="int8"))
        seen = [ref() is None for ref in originals]
    finally:
        gc.enable()
    assert seen == [True, True]
