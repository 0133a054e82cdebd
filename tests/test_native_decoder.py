"""NativeLlamaDecoder: one native call a step gives transformers' logits (up to int8 rounding ties, see TIE) for
w4a8 / int8 / mixed Llama, Mistral and Qwen2 models (prompt, single steps, several tokens at once, grouped-query
attention, Llama 3 rotary scaling, biases), generation stops and samples as it should, ``mixprec generate`` gives
transformers' text in both runtimes, and bad models and inputs are refused with what would fit."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec import InputError, NativeLlamaDecoder, Policy
from mixprec.accounting import model_bytes
from mixprec.kernels import huge_pages, int8_linear, native, onednn_int8, weight_only
from mixprec.nn import native_decoder
from mixprec.nn.linear_int8 import Int8DynamicLinear
from mixprec.nn.linear_weight_only import W4A8Linear

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not (native.available() and native.w4a8_blocked_available()),
                                reason="no native w4a8 blocked kernel in this build")

W4A8 = Policy([(r"lm_head|model\.embed_tokens", "w8g32")], default="w4a8g32")
INT8 = Policy([(r"lm_head|model\.embed_tokens", "w8g32")], default="int8")
W4 = Policy([(r"lm_head|model\.embed_tokens", "w8g32")], default="w4g32")
# q in groups of 64, k and v of 32: the three run one after another; gate and up in one call
W4A8_MIXED_GROUPS = Policy([(r"lm_head|model\.embed_tokens", "w8g32"), (r".*q_proj", "w4a8g64")],
                           default="w4a8g32")
ATTENTION_INT8_MLP_W4A8 = Policy([(r"lm_head|model\.embed_tokens", "w8g32"), (r".*\.mlp\..*", "w4a8g32")],
                                 default="int8")


def tiny_llama(policy: Policy | None = W4A8, family: str = "Llama", **overrides: object) -> torch.nn.Module:
    """A random 3-layer model of a transformers family (``Llama``, ``Mistral``, ``Qwen2``, ...), quantized."""
    settings = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    settings.update(overrides)
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**settings)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    if policy is not None:
        mixprec.quantize(model, policy)
    return model


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0]


#: How near x / (amax / 127) may come to a rounding tie (k + 0.5) before float rounding can move its int8 code: the
#: native step's norms and attention round in another order (a few ulps; 7.6e-6 is one ulp of 64 to 127). Measured
#: over 12 seeds x 12 tiny models, VNNI and AVX2 builds: 62 runs in 288 moved a code, all at margins <= 2.9e-5.
TIE = 6e-5


def tie_margins(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per position of transformers' forward of ``ids``: the smallest distance of any per-token int8-quantized
    activation (every w4a8 / int8 projection's input) from a rounding tie, in units of its scale."""
    return stepped_reference(model, ids, [len(ids)])[1]


def stepped_reference(model: torch.nn.Module, ids: torch.Tensor, steps: list[int],
                      cache: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits of ``ids`` fed ``steps[0]`` tokens, then ``steps[1]``, ... (over ``cache`` as
    ``past_key_values``; None: one forward of all of them), and :func:`tie_margins` of those forwards."""
    margins = [torch.full((0,), 0.5)]

    def record(module: torch.nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        scaled = x / (x.abs().amax(-1, keepdim=True) / 127)
        margins[-1] = torch.minimum(margins[-1], (scaled - scaled.floor() - 0.5).abs().nan_to_num(0.5).amin(-1))

    hooks = [module.register_forward_pre_hook(record) for module in model.modules()
             if isinstance(module, (W4A8Linear, Int8DynamicLinear))]
    logits = []
    try:
        with torch.inference_mode():
            for start, count in zip(torch.tensor([0, *steps]).cumsum(0).tolist(), steps):
                margins.append(torch.full((count,), 0.5))
                logits.append(model(ids[None, start:start + count], past_key_values=cache,
                                    use_cache=cache is not None).logits[0])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(logits), torch.cat(margins)


def assert_matches_up_to_ties(got: torch.Tensor, expected: torch.Tensor, margins: torch.Tensor,
                              reach: list[int] | None = None) -> None:
    """Logits equal to 1e-6 at every position, up to the first one (if any) where transformers' forward holds an
    activation within :data:`TIE` of a rounding tie: there float rounding may move an int8 code, and the cache carries
    the change to every later position (measured: 1e-3 to 1e-2 of these logits). ``reach[p]``: a tie at any position
    in ``[p, reach[p])`` can show first at ``p`` (a quantized KV cache's key chunk shares its scales; default
    ``p + 1``)."""
    error = (got - expected).abs().amax(-1)
    off = (error > 1e-6).nonzero().flatten()
    if len(off):
        first = int(off[0])
        nearest = margins[first:reach[first] if reach else first + 1].min()
        assert nearest < TIE, (f"position {first} differs by {error[first]:.2e} with no activation within {TIE} of a "
                               f"rounding tie (nearest {nearest:.2e})")


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 8},
                                       {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16}},
                                       {"policy": W4A8_MIXED_GROUPS}],
                         ids=["gqa", "mha", "llama3-rope", "w4a8-mixed-groups"])
def test_logits_match_transformers_for_the_prompt_single_steps_and_chunks(overrides: dict) -> None:
    model = tiny_llama(**overrides)
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(model, ids)
    decoder = NativeLlamaDecoder(model, max_length=48)
    got = torch.cat([decoder(ids[:24]), decoder(ids[24:25]), decoder(ids[25:26]), decoder(ids[26:])])
    assert decoder.position == 40
    # measured: at most 2.4e-7 of logits up to 0.94, VNNI and AVX2 builds (the norms and attention sums round);
    # with prompts through ATen's SDPA, 12 seeds x w4a8 / int8 x gqa / mha: at most 2.7e-7, 3 of 48 runs moved at
    # a tie
    margins = tie_margins(model, ids)
    assert_matches_up_to_ties(got, expected, margins)
    decoder.truncate(30)  # the cache past 30 is overwritten: the same logits again
    assert torch.equal(decoder(ids[30:]), got[30:])


@pytest.mark.parametrize("layout", ["dense", "dense-few-rows", "onednn-packed", "attention-int8-mlp-w4a8"])
def test_int8_projections_dense_packed_or_beside_w4a8_match_transformers(layout: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 projections run their module's kernels: the dense weight through int8_linear_dynamic, or up to four rows
    through the kernel that streams it once; the oneDNN-packed one read in place for few rows, else oneDNN's GEMM."""
    if layout == "onednn-packed":
        if not onednn_int8.available():
            pytest.skip("oneDNN has no int8 VNNI GEMM here: int8 weights stay dense")
        monkeypatch.setattr(onednn_int8, "PACKED_MIN_WEIGHTS", 1)  # every int8 layer packed, as large ones are
    else:
        monkeypatch.setattr(onednn_int8, "PACKED_MIN_WEIGHTS", 1 << 62)
    if layout == "dense-few-rows":
        if not native.int8_dense_rows_available():
            pytest.skip("no few-row int8 kernel in this build")
        monkeypatch.setattr(int8_linear, "DENSE_ROWS_MIN_WEIGHTS", 1)  # as for weights of 2^18 elements and more
    model = tiny_llama(ATTENTION_INT8_MLP_W4A8 if layout.startswith("attention") else INT8)
    # Seed 3 puts an o_proj input of the mixed policy exactly on a tie (logits 3.4e-3 apart from there on); seed 4
    # none that round apart on the VNNI and AVX2 builds.
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(4))
    expected = reference_logits(model, ids)
    decoder = NativeLlamaDecoder(model, max_length=40)
    kernels = {"dense": {1}, "dense-few-rows": {1}, "onednn-packed": {2}, "attention-int8-mlp-w4a8": {0, 1}}[layout]
    assert set(decoder.plans[0::2]) == kernels
    few_rows = decoder.plans[1::2]
    assert (max(few_rows) >= 4) == (layout == "dense-few-rows" or layout == "onednn-packed"
                                    and native.int8_packed_rows_available())
    got = torch.cat([decoder(ids[:24]), decoder(ids[24:25]), decoder(ids[25:28]), decoder(ids[28:])])
    # measured: at most 2.2e-7 of logits up to 1.07 in every layout (the same float32 steps as w4a8)
    assert_matches_up_to_ties(got, expected, tie_margins(model, ids))


@pytest.mark.parametrize("tile_elements", [None, 128 * 40], ids=["tiles-default", "tiles-of-40-rows"])
def test_w4_projections_run_their_modules_paths_and_match_transformers(tile_elements: int | None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """w4gN projections (float32 activations) run w4_linear's two paths: the fused kernel up to 16 rows, the weight
    expanded a tile of output rows at a time beyond (here also tiles that do not divide 128 or 256 outputs). No
    activation is rounded to int8, so there are no ties: the logits are transformers' to float rounding."""
    if tile_elements is not None:
        monkeypatch.setattr(weight_only, "W4_TILE_ELEMENTS", tile_elements)
    model = tiny_llama(W4)
    ids = torch.randint(0, 320, (48,), generator=torch.Generator().manual_seed(2))
    expected = reference_logits(model, ids)
    decoder = NativeLlamaDecoder(model, max_length=48)
    assert set(decoder.plans[0::2]) == {3}  # every projection: csrc/llama_decode.cpp's kW4Rows
    got = torch.cat([decoder(ids[:24]), decoder(ids[24:25]), decoder(ids[25:40]), decoder(ids[40:])])
    # measured: at most 3.6e-7 over 6 seeds x 3 tilings (logits up to 0.95): the norms and attention round apart
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()


@pytest.mark.parametrize("policy", [W4A8, INT8], ids=["w4a8", "int8"])
@pytest.mark.parametrize(("family", "overrides"), [("Mistral", {"sliding_window": 40}), ("Qwen2", {}),
                                                   ("Llama", {"attention_bias": True, "mlp_bias": True})],
                         ids=["mistral-window-40", "qwen2-qkv-biases", "llama-all-biases"])
def test_mistral_qwen2_and_biased_projections_match_transformers(family: str, overrides: dict,
                                                                 policy: Policy) -> None:
    """Mistral within its sliding window (every token in reach: the same attention), Qwen2's q / k / v biases and
    biases on all seven projections: each projection adds its bias in its module's kernel."""
    model = tiny_llama(policy, family=family, **overrides)
    # Seeds 1 to 12 on the VNNI and AVX2 builds: 6, 7 and 11 meet no rounding tie in any of the six models.
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(6))
    expected = reference_logits(model, ids)
    decoder = NativeLlamaDecoder(model, max_length=40)
    got = torch.cat([decoder(ids[:24]), decoder(ids[24:25]), decoder(ids[25:28]), decoder(ids[28:])])
    # measured: at most 1.8e-7 of logits up to 0.91 (the same float32 steps as Llama's)
    assert_matches_up_to_ties(got, expected, tie_margins(model, ids))


def test_greedy_generation_picks_transformers_tokens() -> None:
    model = tiny_llama()
    prompt = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 12:]
    decoder = NativeLlamaDecoder(model, max_length=32)
    assert torch.equal(decoder.generate(prompt, max_new_tokens=10), expected)
    assert torch.equal(decoder.generate(prompt[None], max_new_tokens=3), expected[:3])  # [1, tokens] too


def test_generation_stops_at_an_end_token_as_transformers_does() -> None:
    model = tiny_llama()
    prompt = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(7))  # 10 distinct greedy tokens
    decoder = NativeLlamaDecoder(model, max_length=32)
    greedy = decoder.generate(prompt, max_new_tokens=10)
    eos = int(greedy[3])
    first = int((greedy == eos).nonzero()[0])
    assert first == 3
    with torch.inference_mode():
        expected = model.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)[0, 12:]
    assert torch.equal(decoder.generate(prompt, max_new_tokens=10, eos_token_id=eos), greedy[:first + 1])
    assert torch.equal(decoder.generate(prompt, max_new_tokens=10, eos_token_id=eos), expected)
    assert torch.equal(decoder.generate(prompt, max_new_tokens=10, eos_token_id=[319, eos]), greedy[:first + 1])


def test_sampling_draws_from_the_top_k_logits_and_repeats_with_a_seeded_generator() -> None:
    model = tiny_llama()
    prompt = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(2))
    decoder = NativeLlamaDecoder(model, max_length=32)
    greedy = decoder.generate(prompt, max_new_tokens=8)
    assert torch.equal(decoder.generate(prompt, max_new_tokens=8, temperature=1.0, top_k=1), greedy)
    sampled = decoder.generate(prompt, max_new_tokens=8, temperature=2.0, top_k=5,
                               generator=torch.Generator().manual_seed(7))
    again = decoder.generate(prompt, max_new_tokens=8, temperature=2.0, top_k=5,
                             generator=torch.Generator().manual_seed(7))
    assert torch.equal(sampled, again)
    logits = reference_logits(model, torch.cat([prompt, sampled]))[11:-1]  # the logits each token was drawn from
    for row, token in zip(logits, sampled, strict=True):
        assert int(token) in row.topk(5).indices.tolist()
    assert not torch.equal(sampled, greedy)  # measured: seed 7 draws 7 of 8 tokens off their context's argmax


@pytest.mark.parametrize("policy", [W4A8, W4], ids=["w4a8", "w4"])
def test_one_token_is_the_layers_own_modules_composed(policy: Policy) -> None:
    """A first token attends to itself alone (softmax of one score: its value exactly), so the decoder's output is
    the model's own modules composed: norms, v / o / gate / up / down projections, residual adds, head."""
    model = tiny_llama(policy, num_hidden_layers=1)
    layer = model.model.layers[0]
    ids = torch.tensor([5])
    with torch.inference_mode():
        x = model.model.embed_tokens(ids).float()
        value = layer.self_attn.v_proj(layer.input_layernorm(x)).reshape(2, 16)  # 2 kv heads, 4 query heads each
        attention = layer.self_attn.o_proj(value.repeat_interleave(4, dim=0).reshape(1, 128))
        h = x + attention
        mlp = layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(layer.post_attention_layernorm(h)))
                                  * layer.mlp.up_proj(layer.post_attention_layernorm(h)))
        expected = model.lm_head(model.model.norm(h + mlp))
    got = NativeLlamaDecoder(model, max_length=4)(ids)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()


@pytest.mark.skipif(huge_pages.transparent_huge_pages() not in ("always", "madvise"),
                    reason="the kernel offers no transparent huge pages here")
@pytest.mark.parametrize("policy", [W4A8, INT8], ids=["w4a8", "int8"])
def test_the_decoder_gathers_the_layers_tensors_into_huge_pages_shared_with_the_model(
        policy: Policy, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    model = tiny_llama(policy, hidden_size=512, intermediate_size=1024, qkv_bias=True, family="Qwen2")
    ids = torch.arange(6) + 3
    eager = reference_logits(model, ids)
    held_bytes = model_bytes(model)
    monkeypatch.setenv("MIXPREC_HUGE_PAGES", "0")
    apart = NativeLlamaDecoder(model, max_length=16)  # MIXPREC_HUGE_PAGES=0: the tensors where they were
    monkeypatch.delenv("MIXPREC_HUGE_PAGES")
    gathered = NativeLlamaDecoder(model, max_length=16)
    moved = [t for t in gathered.weights if t.layout == torch.strided and t.numel()]
    assert huge_pages.laid_one_after_another(moved) and len(moved) > 3 * 7
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(moved, [t for t in apart.weights
                                                                   if t.layout == torch.strided and t.numel()]))
    layer = model.model.layers[1]
    down = layer.mlp.down_proj
    scales = down.scale_blocked if isinstance(down, W4A8Linear) else down.weight_scale
    for held in (layer.input_layernorm.weight, layer.self_attn.q_proj.bias, scales):
        assert any(held.data_ptr() == t.data_ptr() for t in moved)  # the model holds the moved tensors
    assert isinstance(layer.input_layernorm.weight, torch.nn.Parameter)  # a parameter stays one
    assert torch.equal(gathered(ids), apart(ids))
    assert torch.equal(reference_logits(model, ids), eager)
    assert model_bytes(model) == held_bytes  # every moved tensor counted once, as before
    released: list[int] = []
    monkeypatch.setattr(native_decoder, "release_free_heap", lambda: released.append(1))
    again = NativeLlamaDecoder(model, max_length=16)  # already gathered: nothing moves twice
    assert released == [1]  # the freed originals' heap pages go back to the system (mixprec.heap)
    assert [t.data_ptr() for t in again.weights] == [t.data_ptr() for t in gathered.weights]
    mixprec.save(model, tmp_path / "model.safetensors")
    fresh = tiny_llama(None, hidden_size=512, intermediate_size=1024, qkv_bias=True, family="Qwen2")
    mixprec.load(fresh, tmp_path / "model.safetensors")
    assert torch.equal(reference_logits(fresh, ids), eager)


def test_unsupported_models_are_refused_naming_what_would_fit() -> None:
    with pytest.raises(InputError, match=r"model.layers.0.self_attn.q_proj is W8GroupLinear; .*int8, w4gN, or w4a8gN"):
        NativeLlamaDecoder(tiny_llama(Policy([(r"model\.layers\.0\.self_attn\.q_proj", "w8g32"),
                                              (r"lm_head|model\.embed_tokens", "w8g32")], default="w4a8g32")),
                           max_length=8)
    with pytest.raises(InputError, match=r"model.layers.0.self_attn.q_proj is Linear"):
        NativeLlamaDecoder(tiny_llama(policy=None), max_length=8)
    with pytest.raises(InputError, match="hidden_act 'silu'"):
        NativeLlamaDecoder(tiny_llama(hidden_act="gelu"), max_length=8)
    with pytest.raises(InputError, match=r"model_type one of \('llama', 'mistral', 'qwen2'\)\), got 'qwen3'"):
        NativeLlamaDecoder(tiny_llama(family="Qwen3", head_dim=16), max_length=8)  # its q / k norms: not Llama's
    with pytest.raises(InputError, match=r"sliding window of 16 tokens.*max_length <= 16 \(got 48\)"):
        NativeLlamaDecoder(tiny_llama(family="Mistral", sliding_window=16), max_length=48)
    with pytest.raises(InputError, match=r"sliding window of 8 tokens.*max_length <= 8 \(got 9\)"):
        NativeLlamaDecoder(tiny_llama(family="Qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
                           max_length=9)


def test_bad_lengths_and_token_ids_are_refused() -> None:
    model = tiny_llama(num_hidden_layers=1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="max_length must be a positive int"):
            NativeLlamaDecoder(model, max_length=bad)  # type: ignore[arg-type]
    decoder = NativeLlamaDecoder(model, max_length=8)
    with pytest.raises(InputError, match="int64 tensor of token ids"):
        decoder(torch.zeros(3))
    with pytest.raises(InputError, match=r"\[tokens\] or \[1, tokens\] with tokens >= 1, got \(2, 3\)"):
        decoder(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(InputError, match=r"\[tokens\] or \[1, tokens\] with tokens >= 1, got \(0,\)"):
        decoder(torch.zeros(0, dtype=torch.int64))
    for ids in (torch.tensor([3, 320]), torch.tensor([-1])):
        with pytest.raises(InputError, match=r"token ids must lie in \[0, 320\)"):
            decoder(ids)
    assert decoder.position == 0  # nothing was placed
    decoder(torch.arange(6))
    with pytest.raises(InputError, match="3 tokens at position 6 exceed max_length 8"):
        decoder(torch.arange(3))
    with pytest.raises(InputError, match=r"length must be an int in \[0, 6\]"):
        decoder.truncate(7)
    with pytest.raises(InputError, match="max_new_tokens must be a positive int"):
        decoder.generate(torch.arange(3), max_new_tokens=0)
    for eos in (320, -1, [2, 400], True):
        with pytest.raises(InputError, match=r"eos_token_id must be a token id or a sequence of them in \[0, 320\)"):
            decoder.generate(torch.arange(3), max_new_tokens=2, eos_token_id=eos)  # type: ignore[arg-type]
    for temperature in (-0.5, float("nan"), float("inf"), "1"):
        with pytest.raises(InputError, match="temperature must be a finite number >= 0"):
            decoder.generate(torch.arange(3), max_new_tokens=2, temperature=temperature)  # type: ignore[arg-type]
    for top_k in (0, 321, 2.0):
        with pytest.raises(InputError, match=r"top_k must be None or an int in \[1, 320\]"):
            decoder.generate(torch.arange(3), max_new_tokens=2, temperature=1.0, top_k=top_k)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="with temperature 0 decoding is greedy"):
        decoder.generate(torch.arange(3), max_new_tokens=2, top_k=5)


def test_the_native_operator_checks_its_tensors() -> None:
    model = tiny_llama(num_hidden_layers=1)
    decoder = NativeLlamaDecoder(model, max_length=8)
    hidden = torch.zeros(2, 128)
    arguments = dict(weights=decoder.weights, plans=decoder.plans, final_norm=decoder.final_norm, cos=decoder.cos,
                     sin=decoder.sin, key_cache=decoder.kv_cache[0], value_cache=decoder.kv_cache[1], position=0,
                     heads=8, kv_heads=2, intermediate=256, eps=1e-6, scaling=0.25)
    with pytest.raises(RuntimeError, match="hidden must be a contiguous float32 CPU tensor"):
        native.llama_decode_layers(hidden.double(), **arguments)
    with pytest.raises(RuntimeError, match=r"do not fit a cache of 8"):
        native.llama_decode_layers(hidden, **{**arguments, "position": 7})
    with pytest.raises(RuntimeError, match="weights must hold 37 tensors per layer"):
        native.llama_decode_layers(hidden, **{**arguments, "weights": decoder.weights[:-1]})
    int8_decoder = NativeLlamaDecoder(tiny_llama(INT8, num_hidden_layers=1), max_length=8)
    swapped = list(int8_decoder.weights)
    swapped[2:7] = int8_decoder.weights[7:12]  # q_proj's tensors replaced by k_proj's: 32 outputs instead of 128
    with pytest.raises(RuntimeError, match=r"layer 0, projection 0 .* gives \[2, 32\], .* need \[2, 128\]"):
        native.llama_decode_layers(hidden, **{**arguments, "weights": swapped, "plans": int8_decoder.plans})
    with pytest.raises(RuntimeError, match=r"plans must hold \(kernel, few_rows_max\) for 7 projections"):
        native.llama_decode_layers(hidden, **{**arguments, "plans": decoder.plans[:-2]})
    with pytest.raises(RuntimeError, match=r"plans\[2\] = 5 is not a kernel"):
        native.llama_decode_layers(hidden, **{**arguments, "plans": [0, 0, 5, 0] + decoder.plans[4:]})
    with pytest.raises(RuntimeError, match=r"must be a multiple of kv_heads \(3\)"):
        native.llama_decode_layers(hidden, **{**arguments, "kv_heads": 3})
    with pytest.raises(RuntimeError, match="value_cache must be a contiguous float32 CPU tensor"):
        native.llama_decode_layers(hidden, **{**arguments, "value_cache": decoder.kv_cache[1][:, :, :4]})


@pytest.fixture(scope="module")
def tiny_llama_folder(tokenizer, tmp_path_factory) -> object:  # noqa: ANN001
    """A random 3-layer Llama saved with the BPE tokenizer of conftest (384 tokens)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_llama(policy=None, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("runtime", ["native", "transformers"])
def test_generate_command_continues_a_prompt_as_transformers_does(runtime: str, tiny_llama_folder, tokenizer,
                                                                  capsys) -> None:  # noqa: ANN001
    from mixprec.cli import main
    from mixprec.nn.native_decoder import PROJECTIONS_RULE

    prompt = "A man is playing a guitar."
    precision = "int8" if runtime == "native" else "w8g32"  # any precision through transformers' generate
    head = ["--head", "fp32"] if runtime == "transformers" else []  # else the default: an int8 head
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_folder).eval()
    # the defaults: an int8 head, a w8g32 embedding
    mixprec.quantize(model, Policy([(PROJECTIONS_RULE, precision), (r"model\.embed_tokens", "w8g32")]
                                   + ([] if head else [(r"lm_head", "int8")])))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert main(["generate", str(tiny_llama_folder), "--prompt", prompt, "--precision", precision,
                 "--max-new-tokens", "6", "--runtime", runtime, *head]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tiny_llama_folder}: ") and "x smaller" in lines[0]
    assert lines[1] == prompt + tokenizer.decode(expected, skip_special_tokens=True)
    assert lines[2].startswith(f"[prompt: {ids.shape[1]} tokens in ")
    assert f"{len(expected) - 1} more at " in lines[2]


@pytest.mark.parametrize("embedding", ["fp32", "w8g32", "int8"])
def test_generate_command_quantizes_the_embedding_as_asked(embedding: str, tiny_llama_folder, capsys) -> None:  # noqa: ANN001
    from mixprec.cli import main
    from mixprec.nn.native_decoder import PROJECTIONS_RULE

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_folder).eval()
    rules = [(PROJECTIONS_RULE, "int8"), (r"lm_head", "int8")]
    expected = mixprec.quantize(model, Policy(rules + ([] if embedding == "fp32" else
                                                        [(r"model\.embed_tokens", embedding)]))).total_bytes
    assert main(["generate", str(tiny_llama_folder), "--prompt", "Hi", "--precision", "int8", "--embedding", embedding,
                 "--max-new-tokens", "1"]) == 0
    assert f" B -> {expected:,} B (" in capsys.readouterr().out.splitlines()[0]


def test_generate_text_samples_alike_in_both_runtimes_and_refuses_bad_settings(tiny_llama_folder,
                                                                                tokenizer) -> None:  # noqa: ANN001
    from mixprec.bench.text_generation import generate_text

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_folder).eval()
    mixprec.quantize(model, Policy([(r".*_proj", "int8")]))
    written: list[str] = []
    native_run = generate_text(model, tokenizer, "Two dogs", 5, write=written.append)
    eager_run = generate_text(model, tokenizer, "Two dogs", 5, runtime="transformers")
    assert native_run.text == eager_run.text == "".join(written) and native_run.new_tokens == eager_run.new_tokens
    for runtime in ("native", "transformers"):
        with pytest.raises(InputError, match="temperature must be a finite number >= 0"):
            generate_text(model, tokenizer, "Two dogs", 5, runtime=runtime, temperature=-1.0)
        with pytest.raises(InputError, match="with temperature 0 decoding is greedy"):
            generate_text(model, tokenizer, "Two dogs", 5, runtime=runtime, top_k=3)
    with pytest.raises(InputError, match=r"runtime must be one of \('native', 'transformers'\), got 'onnx'"):
        generate_text(model, tokenizer, "Two dogs", 5, runtime="onnx")


def test_a_chat_prompt_is_the_users_message_in_the_chat_template(tokenizer) -> None:  # noqa: ANN001
    import copy

    from mixprec.bench.text_generation import prompt_ids

    with pytest.raises(InputError, match="this tokenizer has no chat template"):
        prompt_ids(tokenizer, "Two dogs", chat=True)
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    expected = chat("User: Two dogs\nAssistant:", add_special_tokens=False).input_ids
    assert prompt_ids(chat, "Two dogs", chat=True).tolist() == expected
    assert prompt_ids(chat, "Two dogs").tolist() == chat("Two dogs").input_ids


def test_generate_command_refuses_bad_settings_before_loading_the_model(capsys) -> None:  # noqa: ANN001
    from mixprec.cli import _runs_natively, main

    assert main(["generate", "no-such-model", "--prompt", "hi", "--precision", "w8g32"]) == 2
    assert "the native decode step runs int8, w4gN and w4a8gN projections" in capsys.readouterr().err
    assert all(map(_runs_natively, ("w4g32", "w4", "w4a8g64", "int8")))
    assert not any(map(_runs_natively, ("w8g32", "w8", "int8-static", "bf16")))
    for option in ("--head", "--embedding"):
        assert main(["generate", "no-such-model", "--prompt", "hi", "--policy", "p.toml", option, "int8"]) == 2
        assert "--head and --embedding go with --precision" in capsys.readouterr().err
    for argv, message in ((["--max-new-tokens", "0"], "must be a positive integer"),
                          (["--temperature", "-1"], "must be a finite number >= 0"),
                          (["--precision", "int7"], "int7"),
                          (["--embedding", "int7"], "int7"),
                          (["--runtime", "onnx"], "invalid choice")):
        with pytest.raises(SystemExit):
            main(["generate", "no-such-model", "--prompt", "hi", *argv])
        assert message in capsys.readouterr().err
