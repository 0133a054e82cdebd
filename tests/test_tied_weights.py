"""A head tied to its input embedding keeps one quantized tensor when both sides store the same codes."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.nn import W8GroupLinear
from mixprec.tied_weights import share_equal_buffers

transformers = pytest.importorskip("transformers")


def tiny_llama(tied: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if not tied:  # the same float weight in two tensors
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.arange(40, 60)[None]).logits


@pytest.mark.parametrize("precision", ["w8g32", "bf16", "fp16"])
def test_tied_layers_of_one_format_hold_one_tensor_with_the_untied_models_outputs(precision: str) -> None:
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    report = mixprec.quantize(tied, precision)
    untied_report = mixprec.quantize(untied, precision)
    head, table = tied.lm_head, tied.model.embed_tokens
    assert head.weight.data_ptr() == table.weight.data_ptr()
    shared = sum(buffer.nbytes for name, buffer in table.named_buffers() if getattr(head, name) is buffer)
    assert shared >= 512 * 64 * (1 if precision == "w8g32" else 2)  # the codes (and the w8gN scales)
    assert report.total_bytes == untied_report.total_bytes - shared
    row = next(layer for layer in report.layers if layer.name == "lm_head")
    assert row.kernel.endswith("weight shared with 'model.embed_tokens' (tied)")
    assert torch.equal(logits(tied), logits(untied))


def test_tied_layers_of_different_formats_keep_their_own_tensors() -> None:
    model = tiny_llama(tied=True)
    report = mixprec.quantize(model, mixprec.Policy([(r"lm_head", "int8")], default="w8g32"))
    assert model.lm_head.weight_codes().data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not any("shared with" in layer.kernel for layer in report.layers)


def test_only_equal_buffers_are_shared() -> None:
    torch.manual_seed(0)
    first = W8GroupLinear.from_float(torch.nn.Linear(64, 8, bias=False), 32)
    same = W8GroupLinear.from_float(torch.nn.Linear(64, 8, bias=False), 32)
    same.weight.copy_(first.weight)  # equal codes, other scales
    assert share_equal_buffers(first, same) == ["weight"] and same.weight is first.weight
    assert same.weight_scale is not first.weight_scale


def test_a_saved_tied_model_stores_the_tensor_once_and_loads_it_shared(tmp_path) -> None:  # noqa: ANN001
    model = tiny_llama(tied=True)
    mixprec.quantize(model, "w8g32")
    expected = logits(model)
    mixprec.save(model, tmp_path / "tied.safetensors")
    untied = tiny_llama(tied=False)
    mixprec.quantize(untied, "w8g32")
    mixprec.save(untied, tmp_path / "untied.safetensors")
    codes = 512 * 64
    size = (tmp_path / "tied.safetensors").stat().st_size
    assert (tmp_path / "untied.safetensors").stat().st_size - size >= codes
    loaded = tiny_llama(tied=True)
    report = mixprec.load(loaded, tmp_path / "tied.safetensors")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert any(layer.kernel.endswith("(tied)") for layer in report.layers)
    assert torch.equal(logits(loaded), expected)
