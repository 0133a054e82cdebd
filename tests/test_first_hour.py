"""What a user does right after quantize(): casts, device moves, train mode, save_pretrained, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import ExportError, InputError, Policy
from mixprec.cli import main

transformers = pytest.importorskip("transformers")

POLICY = Policy([(r".*q_proj", "int8"), (r".*o_proj", "bf16"), (r".*mlp\..*", "w4g32"), (r".*k_proj", "w8g32"),
                 (r"model\.embed_tokens", "int8"), ("lm_head", "fp16")])
IDS = torch.tensor([[3, 17, 40, 99, 5]])


def quantized_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    mixprec.quantize(model, POLICY)
    return model


def quantized_storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name, module in model.named_modules()
            if isinstance(module, mixprec.nn.QuantizedModule) for key, value in module.state_dict().items()}


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(),
                                  lambda m: m.double()])
def test_casts_leave_quantized_storage_as_the_policy_made_it(cast) -> None:  # noqa: ANN001
    model = quantized_lm()
    before = quantized_storage(model)
    cast(model)
    after = quantized_storage(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16  # was silently fp16 after .half()
    with torch.no_grad():
        logits = model(IDS).logits  # float parts in the cast dtype, quantized layers as they were
    assert torch.isfinite(logits).all()


def test_device_moves_are_refused_by_the_quantized_layers() -> None:
    model = quantized_lm()
    with pytest.raises(InputError, match=r"\(int8\) runs on the CPU only; its storage cannot move to meta"):
        model.to("meta")


def test_train_mode_is_refused_with_what_to_do() -> None:
    model = quantized_lm()
    assert not model.model.layers[0].self_attn.q_proj.training  # quantize builds layers for inference
    model.train()
    with pytest.raises(InputError, match=r"inference-only: its forward computes no gradients. Call model.eval\(\)"):
        model(IDS)
    with torch.no_grad():
        model(IDS)  # no gradients asked for: fine in train mode
    model.eval()
    model(IDS)


def test_save_pretrained_refuses_and_says_what_works(tmp_path: Path) -> None:
    model = quantized_lm()
    with pytest.raises(ExportError, match=r"use mixprec.save\(model, 'model.safetensors'\).*'compressed-tensors'"):
        model.save_pretrained(tmp_path / "folder")
    assert list(tmp_path.iterdir()) == []
    mixprec.save(model, tmp_path / "m.safetensors")
    fresh = transformers.LlamaForCausalLM(model.config).eval()
    mixprec.load(fresh, tmp_path / "m.safetensors")
    with pytest.raises(ExportError, match="reloads wrong"):
        fresh.save_pretrained(tmp_path / "folder")


def test_python_dash_m_and_version() -> None:
    result = subprocess.run([sys.executable, "-m", "mixprec", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"mixprec {mixprec.__version__}"


def test_cli_numbers_are_refused_in_plain_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fashion-mnist", "--epochs", "abc"])
    assert "argument --epochs: must be a positive integer, got 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search-study", "--low-ratio", "half"])
    assert "argument --low-ratio: must be a positive number, got 'half'" in capsys.readouterr().err


def test_unused_rules_name_the_toml_key_and_a_second_quantize_says_why() -> None:
    model = quantized_lm()
    with pytest.raises(mixprec.PolicyError, match=r"write allow_unused = true in a policy TOML") as err:
        mixprec.quantize(model, Policy([(r".*v_proj", "int8"), (r".*q_proj", "int8")]))
    assert "matches only modules mixprec does not quantize" in str(err.value)
    twice = torch.nn.Sequential(torch.nn.Linear(4, 4))
    mixprec.quantize(twice, Policy(default="int8"))
    with pytest.raises(mixprec.PolicyError, match=r"no layer mixprec can quantize .* was it quantized already"):
        mixprec.quantize(twice, Policy([("0", "int8")]))


def test_report_tables_keep_whole_layer_names_in_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    model = quantized_lm()
    text = str(mixprec.quantize(transformers.LlamaForCausalLM(model.config).eval(), POLICY))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        assert name in first_column  # wrapped over lines, never cut


def test_the_native_build_is_found_in_the_cache_after_first_use() -> None:
    from mixprec.kernels import native

    if native.available():
        assert native._built_before()


def test_random_baseline_before_a_study_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search-random-baseline", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "has no sensitivity-sqnr.json: run `mixprec search-study --out" in err and "Errno" not in err
