"""mixprec on Hugging Face models as they are: BERT-, Llama- and GPT-2-style (Conv1D)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import Policy, PolicyError
from mixprec.nn import QuantizedModule
from mixprec.precision import as_linear, is_gpt2_conv1d

transformers = pytest.importorskip("transformers")

ATTENTION = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
FFN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 120, (3, 17), generator=torch.Generator().manual_seed(1))


def output(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=tokens)
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


BERT_RECIPE = Policy([(ATTENTION, "fp16"), (FFN, "int8"), (r"embeddings\.word_embeddings", "w4")], default="fp32")
CASES = {
    "bert": (tiny_bert, BERT_RECIPE),
    "llama": (tiny_llama, Policy([(r".*\.mlp\..*", "int8"), (r".*\.self_attn\..*", "bf16"),
                                  (r"model\.embed_tokens", "w4"), ("lm_head", "w8")], default="fp32")),
    "gpt2": (tiny_gpt2, Policy([(r"transformer\.h\.\d+\.mlp\..*", "int8"), (r"transformer\.h\.\d+\.attn\..*", "w4"),
                                (r"transformer\.wte", "int8")], default="fp32")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_policies_written_against_hf_names_quantize_and_round_trip(case: str, tmp_path: Path) -> None:
    build, policy = CASES[case]
    model, tokens = build(), ids()
    reference = output(model, tokens)
    report = mixprec.quantize(model, policy)
    quantized = [layer for layer in report.layers if layer.precision != "fp32"]
    assert quantized and all(isinstance(model.get_submodule(layer.name), QuantizedModule) for layer in quantized)
    got = output(model, tokens)
    relative = float((got - reference).abs().max() / reference.abs().max())
    assert relative < 0.1  # int8/int4 on random tiny models: measured 0.004-0.03
    path = tmp_path / f"{case}.safetensors"
    mixprec.save(model, path)
    fresh = build()
    mixprec.load(fresh, path)
    assert torch.equal(output(fresh, tokens), got)


def test_gpt2_conv1d_layers_are_replaced_like_linears() -> None:
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    assert is_gpt2_conv1d(conv) and not is_gpt2_conv1d(torch.nn.Linear(4, 4))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(as_linear(conv)(x), conv(x), rtol=0, atol=1e-5)  # same math, other summation order
    report = mixprec.quantize(model, Policy([(r".*\.c_fc", "w8")], default="fp32"))
    layer = report.layer("transformer.h.0.mlp.c_fc")
    assert layer.module_type == "Conv1D" and layer.precision == "w8"
    assert layer.bytes_after == 64 * 256 + 4 * 256 + 4 * 256  # int8 codes, scales, float32 bias


def test_policy_mistakes_on_hf_models_name_real_modules() -> None:
    model = tiny_bert()
    with pytest.raises(PolicyError, match=r"bert.*' -> 'int8': it matches no module\nquantizable layers look like: "
                                          r"'embeddings\.position_embeddings'"):
        mixprec.quantize(model, Policy([(r"bert\.encoder\..*", "int8")]))
    with pytest.raises(PolicyError, match=r"matches only modules mixprec does not quantize "
                                          r"\('embeddings\.LayerNorm': LayerNorm\)"):
        mixprec.quantize(model, Policy([(r".*LayerNorm", "int8")]))


def test_the_search_counts_a_tied_weight_once_and_predicts_exact_bytes() -> None:
    import numpy as np

    from mixprec.accounting import model_bytes
    from mixprec.analysis import build_problem, policy_for, random_choices, search, sensitivity, uniform_bytes

    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for precision in ("int8", "w4", "bf16", "fp16", "w8g32", "fp32"):  # bf16, fp16, w8g32: one quantized copy
        assert uniform_bytes(model, precision) == mixprec.quantize(tiny_llama(), Policy(default=precision)).total_bytes
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    table = sensitivity(model, [ids], ["int8", "w4", "w8g32"], progress=False)
    problem = build_problem(model, table)
    assert [(t.layers, t.precision) for t in problem.merged] == [(("model.embed_tokens", "lm_head"), "w8g32")]

    def measured(choices: dict[str, str]) -> int:
        return mixprec.quantize(tiny_llama(), policy_for(choices)).total_bytes

    everything_fp32 = dict.fromkeys(problem.layers, "fp32")
    head_only = everything_fp32 | {"lm_head": "int8"}  # the embedding still holds the float weight
    assert problem.bytes_of(everything_fp32) == model_bytes(model)
    assert problem.bytes_of(head_only) == measured(head_only) > model_bytes(model)
    both_w8g32 = everything_fp32 | {"lm_head": "w8g32", "model.embed_tokens": "w8g32"}
    w8g32_int8 = everything_fp32 | {"lm_head": "int8", "model.embed_tokens": "w8g32"}
    assert problem.bytes_of(both_w8g32) == measured(both_w8g32) < problem.bytes_of(w8g32_int8) == measured(w8g32_int8)
    low, high = problem.limits("bytes")
    assert low == measured(problem.extreme("bytes", False)) < uniform_bytes(model, "int8")
    assert high == measured(problem.extreme("bytes", True)) > model_bytes(model)
    for budget in np.linspace(low, high, 5).astype(int):
        result = search(model, table, budget_bytes=int(budget))
        assert result.predicted_bytes == measured(result.choices) <= budget
    rng = np.random.default_rng(0)
    for _ in range(3):
        choices = random_choices(problem, (low + high) // 2, rng)
        assert problem.bytes_of(choices) == measured(choices) <= (low + high) // 2
