"""Decode-benchmark helpers: the bytes a decode step reads, the repeated step, their refusals."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec import Policy
from mixprec.bench.decoding import (
    decode_step_bytes,
    dram_read_bandwidth,
    llama_cpp_decode_step,
    native_decode_step,
    torch_decode_step,
)

transformers = pytest.importorskip("transformers")


def tiny_llama(tied: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def float_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter (the rotary embedding's buffer is not saved, not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_step_bytes_count_every_weight_once_and_one_embedding_row(tied: bool) -> None:
    model = tiny_llama(tied)
    embedding = 96 * 64 * 4
    # untied: the embedding reads one row; tied: the head reads the shared weight whole
    expected = float_bytes(model) if tied else float_bytes(model) - embedding + 64 * 4
    assert decode_step_bytes(model, model.get_input_embeddings()) == expected


def test_step_bytes_of_a_quantized_model_are_its_codes_and_scales() -> None:
    model = tiny_llama(tied=False)
    mixprec.quantize(model, Policy([(r"model\.embed_tokens", "w8g32")], default="w4g32"))

    def w4g32(n: int, k: int) -> int:  # int4 codes and one fp16 scale per 32 weights
        return n * k // 2 + n * k // 32 * 2

    per_layer = (w4g32(64, 64) + 2 * w4g32(32, 64) + w4g32(64, 64) + 2 * w4g32(128, 64) + w4g32(64, 128)
                 + 2 * 64 * 4)  # the two RMSNorm weights stay float32
    head, final_norm = w4g32(96, 64), 64 * 4
    embedding_row = 64 + 2 * 2  # int8 codes and two fp16 scales
    assert decode_step_bytes(model, model.get_input_embeddings()) == (
        2 * per_layer + head + final_norm + embedding_row)


def test_decode_step_repeats_the_same_position() -> None:
    model = tiny_llama(tied=False)
    prompt = torch.arange(10)
    step = torch_decode_step(model, prompt)
    first, second = step().logits, step().logits
    with torch.no_grad():  # the step feeds the prompt's last token again, at position 10
        whole = model(torch.cat([prompt, prompt[-1:]])[None]).logits[:, -1:]
    assert torch.equal(first, second)  # the cache was cut back: the same position again
    assert torch.allclose(first, whole, rtol=0, atol=1e-5)


def test_native_decode_step_repeats_the_position_the_torch_step_decodes() -> None:
    model = tiny_llama(tied=False)
    mixprec.quantize(model, Policy([(r"model\.embed_tokens|lm_head", "fp32")], default="int8"))
    prompt = torch.arange(10)
    native = native_decode_step(mixprec.NativeLlamaDecoder(model, max_length=11), prompt)
    first, second = native(), native()
    assert torch.equal(first, second)
    reference = torch_decode_step(model, prompt)().logits[0]
    assert torch.allclose(first, reference, rtol=0, atol=5e-7)  # float rounding: 4.5e-8 measured, logits up to 0.4


def test_decode_helpers_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        dram_read_bandwidth(0)
    model = tiny_llama(tied=False)
    with pytest.raises(ValueError, match="1-D token ids of at least 2 tokens"):
        torch_decode_step(model, torch.arange(6).view(2, 3))
    with pytest.raises(ValueError, match="1-D token ids of at least 2 tokens"):
        llama_cpp_decode_step(object(), torch.tensor([3]))
    with pytest.raises(ValueError, match="1-D token ids of at least 2 tokens"):
        native_decode_step(object(), torch.tensor([3]))
    with pytest.raises(ValueError, match="the model's own input embedding"):
        decode_step_bytes(model, torch.nn.Embedding(96, 64))
    with pytest.raises(TypeError, match="takes two modules"):
        decode_step_bytes(model, "embed_tokens")


def test_step_bytes_see_prepacked_int8_weights() -> None:
    model = tiny_llama(tied=False)
    mixprec.quantize(model, Policy([(r"model\.embed_tokens", "fp32")], default="int8"))
    linears = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64) + 96 * 64  # int8 codes
    scales = 4 * (2 * (64 + 2 * 32 + 64 + 2 * 128 + 64) + 96)  # float32 per output channel
    norms, embedding_row = 5 * 64 * 4, 64 * 4
    assert decode_step_bytes(model, model.get_input_embeddings()) == linears + scales + norms + embedding_row
