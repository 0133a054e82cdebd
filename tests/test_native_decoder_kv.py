"""NativeLlamaDecoder over a quantized KV cache: each chunk is quantized to the bits of mixprec's Python cache
(:class:`mixprec.nn.kv_cache.QuantizedKV`), the logits are transformers' over :class:`mixprec.kv.QuantizedKVCache`
fed in the same steps (up to int8 rounding ties), on the AVX-512 attention over codes and on the dequantizing path,
the cache holds the bytes it should, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from test_native_decoder import (  # noqa: F401 (tiny_llama_folder: a fixture)
    INT8,
    W4A8,
    assert_matches_up_to_ties,
    stepped_reference,
    tiny_llama,
    tiny_llama_folder,
)

import mixprec
from mixprec import InputError, NativeLlamaDecoder, Policy
from mixprec.kernels import native
from mixprec.nn.kv_cache import QuantizedKV

transformers = pytest.importorskip("transformers")
kv = pytest.importorskip("mixprec.kv")

pytestmark = pytest.mark.skipif(not (native.available() and native.w4a8_blocked_available()),
                                reason="no native w4a8 blocked kernel in this build")

CHUNK_PARTS = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")
STEPS = [20, 1, 1, 30, 1, 1, 1, 4]  # the last step quantizes no chunk in any layout below: it can be rerun


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [8, 16, 32, 64])
def test_a_chunk_is_quantized_to_the_python_caches_bytes(bits: int, group: int) -> None:
    generator = torch.Generator().manual_seed(group + bits)
    keys = torch.randn(3, group, 32, generator=generator) * 3
    values = torch.randn(3, group, 32, generator=generator)
    keys[1, :, 4] = 0.0  # a channel of zeros: the smallest scale
    keys[2, :, 7] = -keys[2, :, 7].abs()  # all below zero: zero point 255 / 15
    values[0, 3] = torch.arange(32) * 0.5  # exact halves of a scale: ties round to even
    reference = QuantizedKV(bits, group, 0)
    reference.append(keys[None], values[None])
    got = native.kv_quantize_chunk(keys, values, bits, min(group, 32))
    for name, part in zip(CHUNK_PARTS, got):
        assert torch.equal(part, getattr(reference, name)[0]), name


def test_a_chunk_with_nan_or_inf_is_refused() -> None:
    keys, values = torch.zeros(1, 8, 32), torch.zeros(1, 8, 32)
    for bad in (float("nan"), float("inf")):
        broken = keys.clone()
        broken[0, 5, 3] = bad
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            native.kv_quantize_chunk(broken, values, 8, 32)
    with pytest.raises(RuntimeError, match="value_group must divide it"):
        native.kv_quantize_chunk(keys, values, 8, 24)


# head_dim 32: the AVX-512 attention reads the codes; head_dim 16 (or value groups of 8): dequantized, then attended.
LAYOUTS = {"codes-read-in-place": dict(hidden_size=256, group=32, residual=8),
           "codes-read-in-place-no-window": dict(hidden_size=256, group=16, residual=0),
           "dequantized": dict(hidden_size=128, group=8, residual=4)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("policy", [W4A8, INT8], ids=["w4a8", "int8"])
def test_logits_match_transformers_over_mixprecs_quantized_cache(bits: int, layout: str, policy: object) -> None:
    settings = LAYOUTS[layout]
    model = tiny_llama(policy, hidden_size=settings["hidden_size"])
    group, residual = settings["group"], settings["residual"]
    head_dim = settings["hidden_size"] // 8
    if layout.startswith("codes") and not native.kv_attention_available():
        pytest.skip("no AVX-512 decode attention in this build: the codes are dequantized instead (other layout)")
    ids = torch.randint(0, 320, (sum(STEPS),), generator=torch.Generator().manual_seed(2))
    cache = kv.QuantizedKVCache(bits, group, residual, attention="codes")
    expected, margins = stepped_reference(kv.use_code_attention(model), ids, STEPS, cache)
    decoder = NativeLlamaDecoder(model, max_length=64, kv_bits=bits, kv_group_size=group, kv_residual=residual)
    got = torch.cat([decoder(chunk) for chunk in ids.split(STEPS)])
    quantized = (sum(STEPS) - residual) // group * group
    assert decoder.quantized_tokens == cache.layers[0].store.quantized_tokens == quantized
    # A tie at token t moves t's keys, and with them its key chunk's scales: every earlier position of that chunk
    # that reads the chunk in the step that quantized it. Measured over 4 seeds x 2 bits x these 3 layouts x 2
    # policies x both reference attentions (96 runs): 36 moved, every one first at a position so reached; before
    # that, at most 3.0e-7 apart.
    ends = torch.tensor(STEPS).cumsum(0)
    reach = [min((p // group + 1) * group, int(ends[ends > p][0])) for p in range(len(ids))]
    assert_matches_up_to_ties(got, expected, margins, reach)
    decoder.truncate(55)  # back before the last step: its tokens are still in the float window
    assert torch.equal(decoder(ids[55:]), got[55:])
    float_bytes = 2 * 3 * 2 * 64 * head_dim * 4
    capacity = (64 - residual) // group * group
    code_bytes = 2 * 3 * 2 * capacity * head_dim * bits // 8
    scale_bytes = 3 * 2 * 3 * (capacity // group * head_dim + capacity * head_dim // min(group, head_dim))
    window_bytes = 2 * 3 * 2 * (residual + group) * head_dim * 4
    assert decoder.kv_cache_bytes == code_bytes + scale_bytes + window_bytes + 3 * 8
    assert NativeLlamaDecoder(model, max_length=64).kv_cache_bytes == float_bytes


def test_generation_over_a_quantized_cache_picks_transformers_tokens() -> None:
    model = tiny_llama(W4A8, hidden_size=256)
    prompt = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(5))
    decoder = NativeLlamaDecoder(model, max_length=48, kv_bits=8, kv_group_size=8, kv_residual=8)
    got = decoder.generate(prompt, max_new_tokens=24)
    with torch.inference_mode():
        expected = model.generate(prompt[None], max_new_tokens=24, do_sample=False,
                                  past_key_values=kv.QuantizedKVCache(8, 8, 8))[0, 12:]
    assert torch.equal(got, expected)
    assert decoder.quantized_tokens == 24  # 35 tokens cached (the last token is not fed), 11 in float32
    decoder.generate(prompt, max_new_tokens=2)  # starts over from an empty cache
    assert decoder.quantized_tokens == 0 and decoder.position == 13


def test_bad_kv_settings_and_truncations_are_refused() -> None:
    model = tiny_llama(W4A8, hidden_size=256, num_hidden_layers=1)
    with pytest.raises(InputError, match="KV cache bits must be 4 or 8, got 2"):
        NativeLlamaDecoder(model, max_length=16, kv_bits=2)
    with pytest.raises(InputError, match="group size must be an even integer >= 2, got 5"):
        NativeLlamaDecoder(model, max_length=16, kv_bits=8, kv_group_size=5)
    with pytest.raises(InputError, match="residual window must be an integer >= 0, got -1"):
        NativeLlamaDecoder(model, max_length=16, kv_bits=8, kv_residual=-1)
    with pytest.raises(InputError, match="kv_group_size 24 does not divide head_dim 32"):
        NativeLlamaDecoder(model, max_length=16, kv_bits=8, kv_group_size=24)
    decoder = NativeLlamaDecoder(model, max_length=40, kv_bits=8, kv_group_size=8, kv_residual=4)
    decoder(torch.arange(20))
    assert decoder.quantized_tokens == 16
    with pytest.raises(InputError, match=r"holds tokens \[0, 16\) as codes; truncate to 0 or to a length in "
                                         r"\[16, 20\], got 10"):
        decoder.truncate(10)
    assert decoder.position == 20


def test_the_native_operator_checks_the_quantized_cache() -> None:
    model = tiny_llama(W4A8, hidden_size=256, num_hidden_layers=1)
    decoder = NativeLlamaDecoder(model, max_length=16, kv_bits=8, kv_group_size=8, kv_residual=4)
    arguments = dict(weights=decoder.weights, plans=decoder.plans, final_norm=decoder.final_norm, cos=decoder.cos,
                     sin=decoder.sin, kv_cache=decoder.kv_cache, position=0, heads=8, kv_heads=2, intermediate=256,
                     eps=1e-6, scaling=32**-0.5, bits=8, group=8, residual=4, value_group=8)
    hidden = torch.zeros(2, 256)
    with pytest.raises(RuntimeError, match="a quantized KV cache is 9 tensors, got 8"):
        native.llama_decode_layers_quantized_kv(hidden, **{**arguments, "kv_cache": decoder.kv_cache[:-1]})
    with pytest.raises(RuntimeError, match="KV cache bits must be 4 or 8, got 6"):
        native.llama_decode_layers_quantized_kv(hidden, **{**arguments, "bits": 6})
    with pytest.raises(RuntimeError, match="a window of residual \\+ group tokens"):
        native.llama_decode_layers_quantized_kv(hidden, **{**arguments, "residual": 8})
    wrong = list(decoder.kv_cache)
    wrong[3] = wrong[3].to(torch.int8)
    with pytest.raises(RuntimeError, match="quantized KV cache tensor 3 must be a contiguous CPU Byte tensor"):
        native.llama_decode_layers_quantized_kv(hidden, **{**arguments, "kv_cache": wrong})
    with pytest.raises(RuntimeError, match="the cache holds 2 KV heads, the model 4"):
        native.llama_decode_layers_quantized_kv(hidden, **{**arguments, "kv_heads": 4})
    with pytest.raises(RuntimeError, match=r"position 12 is not within its float window \[0, 12\)"):
        native.llama_decode_layers_quantized_kv(hidden, **{**arguments, "position": 12})
    assert int(decoder.kv_cache[-1][0]) == 0  # nothing was written


def test_generate_text_quantizes_the_cache_in_both_runtimes(tiny_llama_folder, tokenizer,  # noqa: ANN001, F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mixprec.bench import text_generation

    decoders: list[NativeLlamaDecoder] = []

    class Recorded(NativeLlamaDecoder):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            decoders.append(self)

    monkeypatch.setattr(text_generation, "NativeLlamaDecoder", Recorded)
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_folder).eval()
    mixprec.quantize(model, Policy([(r".*_proj", "int8")]))
    # 150 new tokens: the first chunk of 64 leaves the float32 window (64 to 127 tokens) as codes
    native_run = text_generation.generate_text(model, tokenizer, "Two dogs", 150, kv_bits=8)
    assert decoders[0].kv_bits == 8 and decoders[0].quantized_tokens == 64 and native_run.new_tokens == 150
    caches: list[object] = []
    model_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: caches.append(kwargs["past_key_values"]) or
                        model_generate(*args, **kwargs))
    eager_run = text_generation.generate_text(model, tokenizer, "Two dogs", 150, runtime="transformers", kv_bits=4)
    assert isinstance(caches[0], kv.QuantizedKVCache) and caches[0].bits == 4 and eager_run.new_tokens == 150
    assert caches[0].layers[0].store.quantized_tokens == 64
    for bad in (2, 16):
        with pytest.raises(InputError, match=f"KV cache bits must be 4 or 8, got {bad}"):
            text_generation.generate_text(model, tokenizer, "Two dogs", 5, kv_bits=bad)


def test_a_step_that_fails_part_way_empties_the_quantized_cache() -> None:
    model = tiny_llama(W4A8, hidden_size=256, attention_bias=True)
    ids = torch.randint(0, 320, (30,), generator=torch.Generator().manual_seed(3))
    expected = NativeLlamaDecoder(model, max_length=40, kv_bits=8, kv_group_size=8, kv_residual=4)(ids)
    decoder = NativeLlamaDecoder(model, max_length=40, kv_bits=8, kv_group_size=8, kv_residual=4)
    decoder(ids[:20])
    bias = model.model.layers[1].self_attn.k_proj.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = float("nan")  # layer 1's keys: layer 0 has appended (and quantized) before the error
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        decoder(ids[20:])
    assert decoder.position == 0 and decoder.quantized_tokens == 0 and int(decoder.kv_cache[-1].max()) == 0
    with torch.no_grad():
        bias.copy_(saved)
    assert torch.equal(decoder(ids), expected)  # a clean start again
