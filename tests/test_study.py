"""The Fashion-MNIST study end to end (one short epoch) and its CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from mixprec.cli import main
from mixprec.studies.fashion_mnist import COLUMNS, StudyConfig, run, study_policies


def test_study_writes_every_precision(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(StudyConfig(data=str(fashion_dir), out=str(out), epochs=1, rounds=1, calibration_samples=256),
        Console(file=open(tmp_path / "log.txt", "w")))
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS
    assert [r["precision"] for r in rows] == list(study_policies())
    by = {r["precision"]: r for r in rows}
    assert int(by["fp32"]["total_bytes"]) == 50890 * 4
    assert int(by["fp16"]["total_bytes"]) == 50890 * 2
    # int8: 1 byte per weight, fp32 bias and per-channel scales: 50816 + 74 * (4 + 4)
    assert int(by["int8"]["total_bytes"]) == 50816 + 74 * 8
    assert float(by["fp32"]["accuracy"]) > 80.0  # one epoch
    assert json.loads((out / "results.json").read_text())["results"][0]["precision"] == "fp32"
    assert (out / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_bad_arguments(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["fashion-mnist", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lacks Fashion-MNIST files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fashion-mnist", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_cli_explain_prints_the_policy_table(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "fp32"\n[[rules]]\npattern = "fc1"\nprecision = "w4g16"\n')
    assert main(["explain", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "w4g16" in out and "31,616" in out  # 784 * 64 / 2 + 2 * 64 * 49 + 4 * 64
    bad = tmp_path / "bad.toml"
    bad.write_text('default = "int3"\n')
    assert main(["explain", str(bad)]) == 2
    assert "unknown precision 'int3'" in capsys.readouterr().err
