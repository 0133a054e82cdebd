"""The CNN study end to end on the real spoken-digit data (a short run), and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixprec import InputError
from mixprec.studies.cnn import CnnStudyConfig, cross_fitted_share, fidelity_ranks, run


def test_a_short_dscnn_study_writes_every_row_and_the_comparison(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "fsdd" / "recordings").is_dir():
        pytest.fail(f"test data missing: {data}/fsdd (tests need ../shared/data beside the project)")
    config = CnnStudyConfig(data=str(data), out=str(tmp_path), models=("dscnn",), dscnn_epochs=2,
                            random_policies=4, group=2, resamples=50, rounds=1, refine_evaluations=6)
    run(config)
    payload = json.loads((tmp_path / "dscnn-results.json").read_text())
    labels = [row["label"] for row in payload["results"]]
    assert labels[:5] == ["fp32", "bf16", "int8", "int8-static", "w4"]
    assert "searched 0.6x int8 bytes" in labels and "NNCF-style 0.7x" in labels
    for row in payload["results"]:
        if row["label"].startswith("searched 0."):
            ratio = float(row["label"].split()[1][:-1])
            assert row["bytes"] <= ratio * payload["int8_bytes"]
    assert set(payload["random_baseline"]) == {"0.6x", "0.7x", "0.6x refined", "0.7x refined"}
    for ratio in ("0.6x", "0.7x"):  # refined on the same samples' KL: never less faithful than the start
        refined = payload["refinements"][ratio]
        assert refined["evaluations"] <= 6 and refined["train_kl"] <= refined["train_kl_start"]
        assert rows_by_label(payload)[f"refined {ratio} int8 bytes"]["bytes"] <= float(ratio[:-1]) * payload[
            "int8_bytes"]
    rows = {row["label"]: row for row in payload["results"]}
    assert rows["fp32"]["train_kl"] == 0 and rows["w4"]["train_kl"] > rows["int8"]["train_kl"] > 0
    fidelity = payload["random_baseline"]["0.6x"]["fidelity"]
    assert fidelity["searched_train_kl"] == rows["searched 0.6x int8 bytes"]["train_kl"]
    assert 0 <= fidelity["searched_kl_below_share"] <= 1
    assert (tmp_path / "dscnn-results.csv").is_file() and (tmp_path / "dscnn-pareto.png").stat().st_size > 0
    assert [fold["batchnorm"] for fold in payload["folded"]][:2] == ["features.1", "features.4"]


def test_the_dscnn_cross_validated_over_speakers_pools_their_recordings(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    config = CnnStudyConfig(data=str(data), out=str(tmp_path), models=("dscnn",), dscnn_epochs=1,
                            kws_test_speaker="george,lucas", budget_ratios=(0.6,), random_policies=3, group=2,
                            resamples=20, rounds=1, refine_evaluations=2)
    payload = run(config)["dscnn"]
    folds = payload["folds"]
    assert [f["test_samples"] for f in folds] == [500, 500] and "george" in folds[0]["task"]
    rows = rows_by_label(payload)
    for label in ("fp32", "int8", "w4", "searched 0.6x int8 bytes", "refined 0.6x int8 bytes"):
        # equal folds: the pooled accuracy is the mean of the two (each rounded to 0.01)
        mean = (folds[0]["accuracy"][label] + folds[1]["accuracy"][label]) / 2
        assert abs(rows[label]["accuracy"] - mean) <= 0.01
        assert rows[label]["ms_b64"] is None  # folds are not timed
    assert folds[0]["accuracy"]["fp32"] != folds[1]["accuracy"]["fp32"]  # two models, two test sets
    assert len(payload["random_policies"]["0.6x"]) == 3
    assert payload["random_baseline"]["0.6x"]["accuracy"]["searched"] == pytest.approx(
        rows["searched 0.6x int8 bytes"]["accuracy"] / 100, abs=1e-4)
    with pytest.raises(InputError, match=r"unknown 'bob'; name one or more of george, jackson, lucas"):
        run(CnnStudyConfig(data=str(data), out=str(tmp_path), models=("dscnn",), kws_test_speaker="lucas,bob"))
    with pytest.raises(InputError, match="a name repeats"):
        run(CnnStudyConfig(data=str(data), out=str(tmp_path), models=("dscnn",), kws_test_speaker="lucas,lucas"))


def rows_by_label(payload: dict) -> dict[str, dict]:
    return {row["label"]: row for row in payload["results"]}


def test_cross_fitted_share_picks_on_one_half_and_scores_the_other() -> None:
    searched = np.array([1, 1, 1, 1], dtype=float)
    # policy a is perfect on the even samples only, b on the odd ones: chosen on one half,
    # each scores 0 on the other, so the searched policy beats every group
    a, b = np.array([1, 0, 1, 0], dtype=float), np.array([0, 1, 0, 1], dtype=float)
    result = cross_fitted_share(searched, [a, b], group=2, resamples=10, seed=0)
    assert result["best_of_group_median"] == 0.0 and result["searched_beats_share"] == 1.0
    losses = cross_fitted_share(np.array([0.5, 0.5]), [np.array([0.1, 0.9])], 1, 5, 0, higher_is_better=False)
    assert losses["searched_beats_share"] == 0.0  # 0.5 is not below 0.5


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(InputError, match="unknown models"):
        CnnStudyConfig(models=("vgg",)).check()
    with pytest.raises(InputError, match="group"):
        CnnStudyConfig(random_policies=3, group=5).check()
    with pytest.raises(InputError, match=r"budget ratios must lie in \(0, 1\)"):
        CnnStudyConfig(budget_ratios=(1.5,)).check()
    with pytest.raises(InputError, match="refine_evaluations must be >= 0"):
        CnnStudyConfig(refine_evaluations=-1).check()
    with pytest.raises(InputError, match="unknown sensitivity metric 'fisher'; choose sqnr, kl"):
        CnnStudyConfig(sensitivity_metric="fisher").check()
    with pytest.raises(InputError, match="unknown DS-CNN normalization 'utterance'; choose dataset, recording"):
        CnnStudyConfig(kws_normalization="utterance").check()


def test_fidelity_ranks_say_whether_training_kl_predicts_the_test_set() -> None:
    pool_kl = [0.1, 0.2, 0.3, 0.4]
    accuracy = [np.full(4, v) for v in (0.9, 0.8, 0.7, 0.6)]  # less KL, more accurate: rank correlation -1
    losses = [np.full(4, v) for v in (0.1, 0.2, 0.3, 0.4)]
    ranks = fidelity_ranks(0.15, pool_kl, accuracy, losses)
    assert ranks["searched_kl_below_share"] == 0.75 and ranks["pool_median_train_kl"] == 0.25
    assert ranks["spearman_train_kl_test_accuracy"] == -1.0 and ranks["spearman_train_kl_test_nll"] == 1.0


def test_the_cli_refuses_a_negative_refinement_count(capsys: pytest.CaptureFixture[str]) -> None:
    from mixprec.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["cnn-study", "--refine-evaluations", "-1"])
    assert "argument --refine-evaluations: must be an integer >= 0, got -1" in capsys.readouterr().err
    assert build_parser().parse_args(["cnn-study", "--refine-evaluations", "0"]).refine_evaluations == 0


def test_spoken_digit_grids_standardized_per_recording_or_by_the_training_split() -> None:
    from mixprec.studies.cnn_models import spoken_digits_task

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    own = spoken_digits_task(str(data), "lucas", "recording")
    for grids in (own.x_train, own.x_test):
        flat = grids.flatten(1).double()
        # measured: means within 3.7e-7 of 0, deviations within 1.2e-7 of 1 (float32 arithmetic)
        assert flat.mean(1).abs().max() < 1e-6 and (flat.std(1, unbiased=False) - 1).abs().max() < 5e-7
    shared = spoken_digits_task(str(data), "lucas", "dataset")
    # measured: 4.1e-9 and 3.7e-7
    assert abs(float(shared.x_train.double().mean())) < 1e-7 and abs(float(shared.x_train.double().std()) - 1) < 1e-6
    assert float(shared.x_test.flatten(1).std(1).std()) > 0.05  # one scale for all: recordings keep their spread
    assert torch.equal(own.y_test, shared.y_test) and len(own.x_test) == 500
    with pytest.raises(InputError, match="unknown normalization 'utterance'; choose dataset, recording"):
        spoken_digits_task(str(data), "lucas", "utterance")
