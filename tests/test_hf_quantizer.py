"""MixprecConfig: quantizing while transformers loads gives quantize()'s bits; save_pretrained /
from_pretrained round-trip bit-identically; bad input is refused before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import Policy, PolicyError
from mixprec.kernels import onednn_int8
from mixprec.nn import Int8DynamicLinear, Int8PackedLinear, QuantizedModule

transformers = pytest.importorskip("transformers")
hf_quantizer = pytest.importorskip("mixprec.export.hf_quantizer")
MixprecConfig = hf_quantizer.MixprecConfig

IDS = torch.tensor([[1, 5, 9, 200, 33, 7]])
MIXED = Policy([(r".*q_proj", "int8"), (r".*k_proj", "w8g32"), (r".*v_proj", "bf16"), (r".*o_proj", "fp16"),
                (r".*mlp\..*", "w4g32"), ("lm_head", "w4a8g32"), (r"model\.embed_tokens", "w4g32")])


def save_float(tmp_path: Path, arch: str = "llama", tied: bool = False, hidden: int = 64) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=384, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2 if hidden == 64 else 1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        for layer in model.model.layers:  # non-zero biases, so a bias lost on the way would show
            torch.nn.init.uniform_(layer.self_attn.q_proj.bias, -0.5, 0.5)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    folder = tmp_path / f"float-{arch}-{hidden}"
    model.save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantizing_while_loading_gives_quantizes_bits(arch: str, tmp_path: Path) -> None:
    folder = save_float(tmp_path, arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    mixprec.quantize(reference, MIXED)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(MIXED)).eval()
    theirs, ours = dict(loaded.named_modules()), dict(reference.named_modules())
    for name, module in ours.items():
        if isinstance(module, QuantizedModule):
            assert type(theirs[name]) is type(module), name
            for key, value in module.state_dict().items():
                assert torch.equal(theirs[name].state_dict()[key], value), (name, key)
    assert torch.equal(logits(loaded), logits(reference))


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path: Path) -> None:
    folder = save_float(tmp_path, hidden=2048)  # 2048 x 2048 projections: the oneDNN-packed int8 layout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(MIXED)).eval()
    packed = onednn_int8.available()  # oneDNN's pack needs VNNI or AMX; else the layer holds the dense codes
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8DynamicLinear) and isinstance(layer, Int8PackedLinear) == packed
    loaded.save_pretrained(tmp_path / "quantized")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "quantized").eval()
    layer = again.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8DynamicLinear) and isinstance(layer, Int8PackedLinear) == packed
    assert again.model.layers[0].mlp.up_proj.weight_packed.dtype == torch.uint8
    assert torch.equal(logits(again), logits(loaded))


@pytest.mark.parametrize("precision", ["w8g32", "bf16"])
def test_a_tied_head_and_embedding_load_as_one_quantized_tensor_and_round_trip(precision: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    folder = save_float(tmp_path, tied=True)
    policy = Policy([(r"lm_head|model\.embed_tokens", precision), (r".*mlp\..*", "w4g32")])
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    mixprec.quantize(reference, policy)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(policy)).eval()
    for model in (reference, loaded):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded), logits(reference))
    loaded.save_pretrained(tmp_path / "quantized")
    with safe_open(str(tmp_path / "quantized" / "model.safetensors"), "pt") as handle:
        assert not [key for key in handle.keys() if key.startswith("lm_head.")]  # written once, as the embedding's
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "quantized").eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(again), logits(reference))


def test_refusals_before_loading(tmp_path: Path) -> None:
    folder = save_float(tmp_path)
    with pytest.raises(PolicyError, match="int8-static needs calibration data"):
        MixprecConfig(Policy(default="int8-static"))
    with pytest.raises(PolicyError, match="MixprecConfig needs a policy"):
        MixprecConfig()
    with pytest.raises(PolicyError, match="takes a mixprec.Policy, a precision name or a policy dict"):
        MixprecConfig(policy=[("lm_head", "int8")])
    with pytest.raises(PolicyError, match="unused rules"):
        transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=MixprecConfig(Policy([(r"model\.norm", "int8")])))
    tied = save_float(tmp_path / "tied", tied=True)
    for rules in ([("lm_head", "int8")], [("lm_head", "int8"), (r"model\.embed_tokens", "w8g32")]):
        with pytest.raises(PolicyError, match="share one weight .* both take one precision whose codes they share"):
            transformers.AutoModelForCausalLM.from_pretrained(tied, quantization_config=MixprecConfig(Policy(rules)))
    with pytest.raises(PolicyError, match="run on the CPU; load without a device_map"):
        transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(MIXED),
                                                          device_map={"": "cuda:0"})


def test_damaged_or_foreign_folders_are_refused(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from mixprec import CheckpointError

    folder = save_float(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(MIXED))
    loaded.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight_scale"]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) .*\.layers\.1\.self_attn\.q_proj\.weight_scale\)"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    # a float folder whose config claims to be a mixprec save: transformers' own size check stops it
    # (its report names each mismatched tensor), before mixprec's check for missing ones
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = MixprecConfig(MIXED).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_loading_gives_the_freed_float_weights_back_to_the_system(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_float(tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(hf_quantizer, "release_free_heap", lambda: calls.append(1))
    transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=MixprecConfig(MIXED))
    assert calls == [1]  # once, after the weights are in (mixprec.heap)
