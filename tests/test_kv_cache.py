"""The quantized KV cache: exact layout and bytes, error bounds, generation, bad settings."""

from __future__ import annotations

import pytest
import torch

from mixprec.kernels import native
from mixprec.nn.kv_cache import QuantizedKV

transformers = pytest.importorskip("transformers")

from mixprec.kv import QuantizedKVCache, float_cache_bytes  # noqa: E402


def states(tokens: int, seed: int = 0, heads: int = 3, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, heads, tokens, dim, generator=generator)
    keys[..., 5] *= 20.0  # an outlier channel, as real keys have
    return keys, torch.randn(2, heads, tokens, dim, generator=generator)


@pytest.mark.parametrize("bits", [8, 4])
def test_window_chunks_and_exact_bytes(bits: int) -> None:
    store = QuantizedKV(bits=bits, group_size=32, residual=16)
    keys, values = states(100)
    store.append(keys[:, :, :40], values[:, :, :40])
    store.append(keys[:, :, 40:41], values[:, :, 40:41])
    store.append(keys[:, :, 41:], values[:, :, 41:])
    assert len(store) == 100 and store.quantized_tokens == 64 and store.recent_tokens == 36  # 16 <= 36 < 48
    elements = 2 * 3 * 64 * 64  # batch x heads x quantized tokens x head_dim
    per_group = 2 + 1  # fp16 scale + uint8 zero point
    expected = 2 * elements * bits // 8 + per_group * (elements // 32) * 2 + 2 * 2 * 3 * 36 * 64 * 4
    assert store.nbytes() == expected
    got_keys, got_values = store.states(torch.float32)
    assert torch.equal(got_keys[:, :, 64:], keys[:, :, 64:]) and torch.equal(got_values[:, :, 64:], values[:, :, 64:])


def check_grid_error(x: torch.Tensor, got: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> None:
    """Inside the grid's range the error is at most half a step; beyond it (the zero point
    is rounded, so the grid can miss the range ends by half a step) at most one step."""
    low, high = -zero * scale, (2**bits - 1 - zero) * scale
    error = (got - x).abs()
    inside = (x >= low) & (x <= high)
    slack = 1e-6 * x.abs().amax()  # float32 rounding of x / scale and of (q - zero) * scale
    assert bool((error[inside] <= (0.5 * scale.expand_as(x))[inside] + slack).all())
    assert bool((error <= scale + slack).all())
    assert bool(inside.float().mean() > 0.95)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step_inside_the_grid(bits: int) -> None:
    store = QuantizedKV(bits=bits, group_size=32, residual=0)
    keys, values = states(64, seed=1)
    store.append(keys, values)
    assert store.quantized_tokens == 64
    got_keys, got_values = store.dequantized()
    # Keys: one (scale, zero) per channel for each chunk of 32 tokens.
    key_scale = store.key_scale.float().unsqueeze(3)
    key_zero = store.key_zero.float().unsqueeze(3)
    check_grid_error(keys.unflatten(2, (2, 32)), got_keys.unflatten(2, (2, 32)), key_scale, key_zero, bits)
    # Values: one (scale, zero) per token for each group of 32 channels.
    value_scale = store.value_scale.float().unsqueeze(-1)
    value_zero = store.value_zero.float().unsqueeze(-1)
    check_grid_error(values.unflatten(-1, (2, 32)), got_values.unflatten(-1, (2, 32)), value_scale, value_zero, bits)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def test_generate_with_the_cache_and_teacher_forced_logits() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 200, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        reference = model.generate(ids, max_new_tokens=30, do_sample=False,
                                   past_key_values=transformers.DynamicCache())
        for bits, tolerance in ((8, 0.02), (4, 0.3)):
            cache = QuantizedKVCache(bits=bits, group_size=32, residual=16)
            chunks = [model(ids[:, :60], past_key_values=cache).logits]
            chunks += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(60, 100)]
            error = float((torch.cat(chunks, dim=1) - full).abs().max() / full.abs().max())
            assert error < tolerance  # measured: int8 0.006, int4 0.09
            cache = QuantizedKVCache(bits=bits, group_size=32, residual=16)
            out = model.generate(ids, max_new_tokens=30, do_sample=False, past_key_values=cache)
            assert out.shape == reference.shape and cache.get_seq_length() == 129
            if bits == 8:
                assert torch.equal(out, reference)
        dense = transformers.DynamicCache()
        model(ids, past_key_values=dense)
        assert float_cache_bytes(dense) == 2 * 2 * 2 * 100 * 32 * 4  # layers x (k, v) x heads x tokens x dim x fp32


def test_bad_settings_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizedKVCache(bits=3)
    with pytest.raises(ValueError, match="group size must be an even integer"):
        QuantizedKVCache(group_size=33)
    with pytest.raises(ValueError, match="residual window must be an integer >= 0"):
        QuantizedKVCache(residual=-1)
    store = QuantizedKV(bits=8, group_size=48, residual=0)
    keys, values = states(48)
    with pytest.raises(ValueError, match="group size 48 does not divide head_dim 64"):
        store.append(keys, values)
    keys[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantizedKV().append(keys, values)
    model = tiny_llama()
    cache = QuantizedKVCache(max_length=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match=r"generation beyond the model.s context: 256 cached \+ 1 new tokens > 256"):
        model.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10, do_sample=False,
                       past_key_values=cache)


@pytest.mark.parametrize("bits", [8, 4])
def test_native_dequantization_gives_the_torch_bits(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    store = QuantizedKV(bits=bits, group_size=32, residual=8)
    keys, values = states(150, seed=3)
    store.append(keys, values)
    fast_keys, fast_values = store.states(torch.float32)
    reference = store.dequantized()
    done = store.quantized_tokens
    assert torch.equal(fast_keys[:, :, :done], reference[0]) and torch.equal(fast_values[:, :, :done], reference[1])
    monkeypatch.setattr(native, "available", lambda: False)
    slow_keys, slow_values = store.states(torch.float32)
    assert torch.equal(slow_keys, fast_keys) and torch.equal(slow_values, fast_values)


def test_chunked_perplexity_through_a_float_cache_equals_one_full_forward() -> None:
    from mixprec.studies.kv_smollm2 import documents, perplexity

    model = tiny_llama()
    ids = torch.randint(0, 200, (230,), generator=torch.Generator().manual_seed(4))

    def tokenizer(text: str, return_tensors: str) -> dict[str, torch.Tensor]:
        return {"input_ids": ids.unsqueeze(0)}

    docs = documents(tokenizer, ["unused"], doc_tokens=100, max_tokens=None)
    assert [len(d) for d in docs] == [100, 100, 30]
    with torch.no_grad():
        nll = sum(float(torch.nn.functional.cross_entropy(model(d.unsqueeze(0)).logits[0, :-1], d[1:],
                                                          reduction="sum")) for d in docs)
    expected = float(torch.exp(torch.tensor(nll / sum(len(d) - 1 for d in docs))))
    got = perplexity(model, docs, transformers.DynamicCache, chunk=16)
    assert abs(got - expected) / expected < 1e-5  # float32 summation order only
    quantized = perplexity(model, docs, lambda: QuantizedKVCache(bits=4, group_size=16, residual=16), chunk=16)
    assert quantized != got and abs(quantized - got) / got < 0.05


def test_kv_bench_refuses_bad_settings_before_loading_anything(capsys: pytest.CaptureFixture[str]) -> None:
    from mixprec.cli import main

    assert main(["kv-bench", "--residual", "-1"]) == 2
    assert "residual window must be an integer >= 0, got -1" in capsys.readouterr().err
    assert main(["kv-bench", "--group-size", "33"]) == 2
    assert "group size must be an even integer >= 2, got 33" in capsys.readouterr().err


def exact_attention(store: QuantizedKV, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """float64 attention over the dequantized cache, query heads grouped onto KV heads."""
    keys, values = (t.double() for t in store.states(torch.float32))
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    return torch.softmax(query.double() @ keys.transpose(-1, -2) * scaling, dim=-1) @ values


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_attention_on_the_codes_matches_exact_attention(bits: int) -> None:
    worst = 0.0
    for tokens, residual, group, query_heads in ((2048, 64, 64, 9), (300, 0, 32, 3), (64, 0, 64, 12), (130, 64, 32, 3)):
        store = QuantizedKV(bits, group, residual)
        store.append(*states(tokens, seed=tokens))
        query = torch.randn(2, query_heads, 1, 64, generator=torch.Generator().manual_seed(residual))
        assert store.reads_codes(query) == native.kv_attention_available()
        error = store.attend(query, 0.125).double() - exact_attention(store, query, 0.125)
        worst = max(worst, float(error.abs().max()))
    # float32 rounding of scores up to ~50 (the outlier key channel): measured 3.5e-6 (int8) and
    # 2.3e-6 (int4), against 3.6e-6 / 2.7e-6 for PyTorch's SDPA on the dequantized cache
    assert worst < 7e-6


def test_decode_attention_falls_back_where_the_kernel_does_not_apply() -> None:
    store = QuantizedKV(8, 16, 0)  # value groups of 16 channels: not a multiple of 32
    store.append(*states(64, seed=3))
    query = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(4))
    assert not store.reads_codes(query)  # SDPA on the dequantized cache: measured 8.7e-7
    assert float((store.attend(query, 0.125).double() - exact_attention(store, query, 0.125)).abs().max()) < 1.7e-6
    with pytest.raises(ValueError, match="queries of one new token"):
        store.attend(torch.randn(2, 6, 2, 64), 0.125)


def test_generation_reading_the_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    from mixprec.kv import use_code_attention

    model = tiny_llama()
    ids = torch.randint(0, 200, (1, 100), generator=torch.Generator().manual_seed(2))

    def logits(cache: QuantizedKVCache) -> torch.Tensor:
        chunks = [model(ids[:, :60], past_key_values=cache).logits]
        return torch.cat(chunks + [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(60, 100)], 1)

    with torch.no_grad():
        dequantized = {bits: logits(QuantizedKVCache(bits, 32, 16)) for bits in (8, 4)}
        reference = model.generate(ids, max_new_tokens=30, do_sample=False, past_key_values=QuantizedKVCache(8, 32, 16))
        with pytest.raises(RuntimeError, match=r"call mixprec.kv.use_code_attention\(model\) first"):
            model(ids, past_key_values=QuantizedKVCache(8, 32, 16, attention="codes"))
        use_code_attention(model)
        calls = []
        kernel = native.kv_decode_attention
        monkeypatch.setattr(native, "kv_decode_attention", lambda *args: calls.append(1) or kernel(*args))
        for bits in (8, 4):
            codes = logits(QuantizedKVCache(bits, 32, 16, attention="codes"))
            assert float((codes - dequantized[bits]).abs().max()) < 5.4e-7  # rounding only: measured 2.7e-7
        assert len(calls) == (2 * 2 * 40 if native.kv_attention_available() else 0)  # bits x layers x decode steps
        out = model.generate(ids, max_new_tokens=30, do_sample=False,
                             past_key_values=QuantizedKVCache(8, 32, 16, attention="codes"))
        assert torch.equal(out, reference)
        float_out = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=transformers.DynamicCache())
        assert float_out.shape == (1, 105)  # float caches still run (on PyTorch's SDPA)
    with pytest.raises(ValueError, match="attention must be one of dequantize, codes"):
        QuantizedKVCache(attention="fused")
    with pytest.raises(TypeError, match="takes a transformers model"):
        use_code_attention(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not native.kv_attention_available(), reason="no AVX-512 decode attention in this build")
def test_native_decode_attention_refuses_mismatched_operands() -> None:
    store = QuantizedKV(8, 32, 0)
    store.append(*states(64, seed=5))
    operands = [store.key_codes, store.key_scale, store.key_zero, store.value_codes, store.value_scale,
                store.value_zero, store.recent_keys, store.recent_values]
    query = torch.randn(2, 6, 64)
    with pytest.raises(RuntimeError, match=r"query must be \[B, H \* R, D\]"):
        native.kv_decode_attention(torch.randn(2, 5, 64), *operands, 32, 8, 0.125)
    with pytest.raises(RuntimeError, match="query must be float32"):
        native.kv_decode_attention(query.double(), *operands, 32, 8, 0.125)
    with pytest.raises(RuntimeError, match="key scales and zero points must be"):
        native.kv_decode_attention(query, *operands, 64, 8, 0.125)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        native.kv_decode_attention(query, *operands, 32, 3, 0.125)
    with pytest.raises(RuntimeError, match="query heads per KV head must be 1 to 8"):
        native.kv_decode_attention(torch.randn(2, 27, 64), *operands, 32, 8, 0.125)
