"""GGUF export: gguf's own reader dequantizes every tensor to mixprec's dequantized weights bit
for bit, llama.cpp (llama-cpp-python) loads the file, tokenizes like the Hugging Face
tokenizer and computes the logits mixprec computes; bad input is refused with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mixprec
from mixprec import ExportError, Policy
from mixprec.datasets.text_tasks import load_stsb_test
from mixprec.export.gguf import rotary_row_order
from mixprec.nn import W8GroupEmbedding, W8GroupLinear

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

MIXED = Policy([
    (r"model\.layers\.\d+\.self_attn\..*", "w8g32"),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj", "w4g32"),
    (r"model\.layers\.\d+\.mlp\.down_proj", "bf16"),
    (r"lm_head|model\.embed_tokens", "fp16"),
])
EVERY_PRECISION = {
    "model.embed_tokens": "w8g32", "lm_head": "w8g32",
    "model.layers.0.self_attn.q_proj": "w4g32", "model.layers.0.self_attn.k_proj": "w4a8g32",
    "model.layers.0.self_attn.v_proj": "fp16", "model.layers.0.self_attn.o_proj": "bf16",
    "model.layers.0.mlp.gate_proj": "w8g32", "model.layers.0.mlp.up_proj": "fp32",
}


def tiny_lm(arch: str = "llama", tied: bool = True, vocab: int = 384) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32 by the gguf package's reader."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        [int(d) for d in reversed(t.shape)]) for t in reader.tensors}


def weight_of(module: torch.nn.Module) -> np.ndarray:
    weight = module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight
    return weight.detach().float().numpy()


def test_w8g_linear_and_embedding_share_codes_and_round_to_nearest() -> None:
    torch.manual_seed(1)
    table = torch.randn(10, 64)
    linear = torch.nn.Linear(64, 10, bias=False)
    linear.weight.data.copy_(table)
    w8l = W8GroupLinear.from_float(linear, 32)
    w8e = W8GroupEmbedding.from_float(torch.nn.Embedding.from_pretrained(table), 32)
    assert torch.equal(w8l.weight, w8e.weight) and torch.equal(w8l.weight_scale, w8e.weight_scale)
    scale = (table.reshape(10, 2, 32).abs().amax(-1) / 127).to(torch.float16).float()
    expected = torch.round(table.reshape(10, 2, 32) / scale.unsqueeze(-1)).clamp(-127, 127).reshape(10, 64)
    assert torch.equal(w8l.weight.float(), expected)
    assert w8l.storage_bytes() == 10 * 64 + 10 * 2 * 2
    x = torch.randn(3, 64)
    # the forward is a float32 sum of x * (code * scale) in the kernel's order: measured 1.2e-6 from
    # float64 on outputs up to 24, as close as a float32 matmul of the dequantized weight (1.5e-6)
    exact = x.double() @ w8l.dequantized_weight().double().t()
    assert float((w8l(x).double() - exact).abs().max()) < 4e-6
    assert torch.equal(w8e(torch.tensor([3])), w8l.dequantized_weight()[3:4])


def test_w8g_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_lm()
    mixprec.quantize(model, Policy([(r".*mlp.*|lm_head|model\.embed_tokens", "w8g32")]))
    mixprec.save(model, tmp_path / "m.safetensors")
    fresh = tiny_lm()
    mixprec.load(fresh, tmp_path / "m.safetensors")
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reader_dequantizes_every_precision_bit_exactly(arch: str, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_lm(arch)
    if arch == "qwen2":  # q/k/v biases (qwen2's), non-zero so a lost bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.uniform_(proj.bias, -0.5, 0.5)
    rules = [(name.replace(".", r"\."), precision) for name, precision in EVERY_PRECISION.items()]
    mixprec.quantize(model, Policy(rules, default="fp32"))
    path = mixprec.export(model, tmp_path / "model.gguf", format="gguf", tokenizer=tokenizer)
    tensors = read_tensors(path)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in tensors  # tied: written once
    assert [types[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")] \
        == ["Q4_0", "Q4_0", "F16", "BF16", "Q8_0", "F32"]
    modules = dict(model.named_modules())
    for index in range(2):
        for source, target in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                               ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                               ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                               ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                               ("post_attention_layernorm", "ffn_norm")):
            expected = weight_of(modules[f"model.layers.{index}.{source}"])
            if arch == "llama" and target in ("attn_q", "attn_k"):
                expected = expected[rotary_row_order(expected.shape[0], 4 if target == "attn_q" else 2).numpy()]
            assert np.array_equal(tensors[f"blk.{index}.{target}.weight"], expected), (index, target)
        if arch == "qwen2":
            bias = modules[f"model.layers.{index}.self_attn.k_proj"].bias.detach().numpy()
            assert np.array_equal(tensors[f"blk.{index}.attn_k.bias"], bias)
    assert np.array_equal(tensors["token_embd.weight"], weight_of(model.model.embed_tokens))
    assert np.array_equal(tensors["output_norm.weight"], weight_of(model.model.norm))


def test_untied_head_is_written_as_output(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_lm(tied=False)
    mixprec.quantize(model, Policy([("lm_head", "w4g32"), (r"model\.embed_tokens", "bf16")]))
    tensors = read_tensors(mixprec.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer))
    assert np.array_equal(tensors["output.weight"], weight_of(model.lm_head))
    assert np.array_equal(tensors["token_embd.weight"], weight_of(model.model.embed_tokens))


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0,
                            type_k=0, type_v=0)  # float32 KV cache (its default is F16)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize(("arch", "policy", "tolerance"), [
    # measured (logits up to 1.36): fp32 3.6e-7, float rounding in another summation order; mixed
    # 3.8e-3 (llama) / 4.8e-3 (qwen2): llama.cpp rounds activations to Q8_0 / bf16 for its Q8_0,
    # Q4_0 and BF16 matmuls, where mixprec's w8g32 / w4g32 keep float32 activations
    ("llama", Policy(default="fp32"), 1e-6),
    ("qwen2", Policy(default="fp32"), 1e-6),
    ("llama", MIXED, 1e-2),
    ("qwen2", MIXED, 1e-2),
])
def test_llama_cpp_runs_the_export(arch: str, policy: Policy, tolerance: float, tokenizer, shared_data: Path,  # noqa: ANN001
                                   tmp_path: Path) -> None:
    model = tiny_lm(arch)
    mixprec.quantize(model, policy)
    path = mixprec.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer)
    text = " ".join(load_stsb_test(shared_data).second[:3])
    ids = tokenizer(text)["input_ids"][:100]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=128, vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False)[:100] == ids
    llm.close()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    assert np.abs(got - expected).max() <= tolerance


def test_refuses_precisions_gguf_cannot_hold_by_name(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_lm()
    mixprec.quantize(model, Policy([(r".*q_proj", "int8"), (r".*mlp\.up_proj", "w4g64"), (r".*k_proj", "w8")]))
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj' \(linear, int8\): use w8g32") as err:
        mixprec.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer)
    assert "w4g64): use w4g32" in str(err.value) and "(linear, w8): use w8g32" in str(err.value)
    embed = tiny_lm()
    mixprec.quantize(embed, Policy([(r"model\.embed_tokens|lm_head", "w4")]))
    with pytest.raises(ExportError, match=r"embed_tokens' \(embedding, w4\): use w8g32 \(Q8_0\) or fp16"):
        mixprec.export(embed, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_input_and_writes_nothing(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_lm()
    mixprec.quantize(model, Policy([("lm_head", "w8g32"), (r"model\.embed_tokens", "fp16")]))
    with pytest.raises(ExportError, match="share one weight .* hold w8g32 and fp16"):
        mixprec.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer)
    plain = tiny_lm()
    with pytest.raises(ExportError, match="needs the model's tokenizer"):
        mixprec.export(plain, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(ExportError, match="tokenizers-backed"):
        mixprec.export(plain, tmp_path / "m.gguf", format="gguf", tokenizer="gpt2")
    with pytest.raises(ExportError, match="unknown export format 'ggml'"):
        mixprec.export(plain, tmp_path / "m.gguf", format="ggml")
    with pytest.raises(ExportError, match="takes the options tokenizer, gguf_pre, name; got vocab"):
        mixprec.export(plain, tmp_path / "m.gguf", format="gguf", vocab=1)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ExportError, match="Llama- and Qwen2-style causal LMs .* got BertModel"):
        mixprec.export(bert, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer)
    with pytest.raises(ExportError, match="export takes a torch.nn.Module"):
        mixprec.export("model", tmp_path / "m.gguf", format="gguf")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(ExportError, match="exists; choose another path or pass overwrite=True"):
        mixprec.export(plain, existing, format="gguf", tokenizer=tokenizer)
    assert existing.read_bytes() == b"keep"
    mixprec.export(plain, existing, format="gguf", tokenizer=tokenizer, overwrite=True)
    assert existing.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]


def test_a_failing_write_leaves_nothing(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_lm(vocab=300)  # the tokenizer has 384 tokens: refused while writing the tokenizer keys
    with pytest.raises(ExportError, match="token id 383 but the model embeds only 300"):
        mixprec.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_w8_embedding_needs_a_group() -> None:
    with pytest.raises(mixprec.PolicyError, match=r"embed_tokens'.*w8gN, e\.g\. w8g32"):
        mixprec.quantize(tiny_lm(), Policy([(r"model\.embed_tokens", "w8")]))


def test_cli_exports_a_model_folder(tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    from mixprec.cli import main

    folder = tmp_path / "tiny"
    tiny_lm().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    policy = tmp_path / "policy.toml"
    policy.write_text(MIXED.to_toml())
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(folder), "--policy", str(policy), "--format", "gguf", "--out", str(out)]) == 0
    assert f"wrote {out} (gguf)" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.attn_v.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q4_0"
    assert main(["export", str(folder), "--precision", "w8g32", "--format", "gguf", "--out", str(out)]) == 2
    assert "exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(folder), "--precision", "int8", "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
                 "--overwrite"]) == 2
    assert "(linear, int8): use w8g32 (Q8_0)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--precision", "fp16", "--format", "gguf",
                 "--out", str(tmp_path / "y.gguf")]) == 2
    assert "no model folder at" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml", "tiny", "tiny.gguf"]


def test_check_exportable_reads_a_linears_w4_as_w4g32() -> None:
    from mixprec.export import check_exportable

    check_exportable(tiny_lm(), Policy([(r".*mlp\..*", "w4"), (r"lm_head|model\.embed_tokens", "w8g32")]), "gguf")
    with pytest.raises(ExportError, match=r"mlp\.up_proj' \(linear, w4g64\): use w4g32"):
        check_exportable(tiny_lm(), Policy([(r".*mlp\..*", "w4g64")]), "gguf")
    with pytest.raises(ExportError, match=r"embed_tokens' \(embedding, w4\): use w8g32"):
        check_exportable(tiny_lm(), Policy([(r"model\.embed_tokens", "w4")]), "gguf")
