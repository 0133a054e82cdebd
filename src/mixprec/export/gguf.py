"""``format="gguf"``: Llama- and Qwen2-style causal LMs as llama.cpp reads them.

Types per layer (each the layer's own storage, no second rounding; block layouts in
:mod:`mixprec.export.gguf_blocks`):

========================  =========  ==================================
mixprec precision         GGML type  bits per weight
========================  =========  ==================================
fp32                      F32        32
fp16                      F16        16
bf16                      BF16       16
w8g32 (Linear, Embedding) Q8_0       8.5
w4g32, w4a8g32 (Linear)   Q4_0       4.5
========================  =========  ==================================

Norm weights and biases are F32. Tensor names and hyperparameters follow llama.cpp's
``llama`` and ``qwen2`` architectures. For ``llama``, the rows of the query and key
projections are permuted from Hugging Face's rotate-half rotary layout to llama.cpp's
interleaved one (within each head, row ``(pair, half)`` moves to ``(half, pair)``): whole
rows move with their block scales, so values stay bit-identical. A language-model head
tied to the input embedding is written once, as ``token_embd``, and both must then hold
the same precision.

Written with the ``gguf`` package's ``GGUFWriter`` (extra ``gguf``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mixprec.errors import ExportError
from mixprec.export.gguf_blocks import half_bytes, q4_0_bytes, q8_0_bytes
from mixprec.export.gguf_tokenizer import gguf_tokenizer
from mixprec.export.registry import ExportFormat, layer_kind, register
from mixprec.nn import HalfEmbedding, HalfLinear, QuantizedModule, W4Linear, W8GroupEmbedding, W8GroupLinear
from mixprec.precision import as_linear

ARCHITECTURES = ("llama", "qwen2")
_LINEAR_HELD = {"fp32", "fp16", "bf16", "w8g32", "w4g32", "w4a8g32"}
_EMBEDDING_HELD = {"fp32", "fp16", "bf16", "w8g32"}
#: Per-layer tensor names: Hugging Face submodule of ``model.layers.{i}`` -> GGUF name in ``blk.{i}``.
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def nearest(kind: str, precision: str) -> str | None:
    """None when GGUF holds ``precision`` exactly for ``kind``, else the nearest held one."""
    held = _LINEAR_HELD if kind == "linear" else _EMBEDDING_HELD
    if precision in held:
        return None
    if precision.startswith("w4") and kind == "linear":
        return "w4g32 (Q4_0)"
    return "w8g32 (Q8_0)" + (" or fp16" if kind == "embedding" else "")


def _gguf():  # noqa: ANN202
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'mixprec[gguf]'") from None
    return gguf


def tensor_data(module: nn.Module) -> tuple[np.ndarray, object]:
    """A layer's weight as GGUF data: ``(array, raw GGML type or None for a float array)``.
    Quantized types come as uint8 block bytes ``[rows, bytes per row]``."""
    types = _gguf().GGMLQuantizationType
    if isinstance(module, (W8GroupLinear, W8GroupEmbedding)) and module.group_size == 32:
        return q8_0_bytes(module.weight, module.weight_scale).numpy(), types.Q8_0
    if isinstance(module, W4Linear) and module.group_size == 32:
        return q4_0_bytes(module.weight_packed, module.weight_scale).numpy(), types.Q4_0
    if isinstance(module, (HalfLinear, HalfEmbedding)):
        if module.weight.dtype == torch.float16:
            return module.weight.numpy(), None
        return half_bytes(module.weight).numpy(), types.BF16
    if isinstance(module, QuantizedModule):
        raise ExportError(f"GGUF cannot hold a {module.precision} layer ({type(module).__name__})")
    weight = as_linear(module).weight if layer_kind(module) == "linear" else module.weight
    return weight.detach().to(torch.float32).contiguous().numpy(), None


def rotary_row_order(rows: int, heads: int) -> Tensor:
    """Source row of each destination row when llama.cpp's converter permutes a query or key
    projection: within each head, ``[2, half]`` rows become ``[half, 2]``."""
    if rows % (2 * heads):
        raise ExportError(f"{rows} projection rows do not split into {heads} heads of even size")
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(rows)


def _config_value(config: object, key: str) -> object:
    value = getattr(config, key, None)
    if value is None:
        raise ExportError(f"the model's config has no {key!r}, which GGUF's hyperparameters need")
    return value


def _check_supported(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    body = getattr(model, "model", None)
    if arch not in ARCHITECTURES or not hasattr(model, "lm_head") or not hasattr(body, "layers"):
        raise ExportError(
            f"the GGUF writer knows Llama- and Qwen2-style causal LMs (transformers' LlamaForCausalLM / "
            f"Qwen2ForCausalLM, model_type {' or '.join(ARCHITECTURES)}); got {type(model).__name__} "
            f"with model_type {arch!r}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope_type {rope.get('rope_type')!r} is not written yet; the GGUF writer handles 'default'")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ExportError("a Llama with attention or MLP biases is not written yet (llama.cpp's converter permutes "
                          "those too); export a model without them")
    if getattr(config, "use_sliding_window", False):
        raise ExportError("sliding-window attention is not written yet; export a model with use_sliding_window=False")
    return config


def _tied_head(model: nn.Module, config: object) -> bool:
    """Whether the LM head shares the input embedding (and so is written once); refuses a
    tie whose two holders were given different precisions or different values."""
    if not getattr(config, "tie_word_embeddings", False):
        return False
    head, embed = model.lm_head, model.model.embed_tokens
    head_precision = getattr(head, "precision", "fp32")
    embed_precision = getattr(embed, "precision", "fp32")
    if head_precision != embed_precision:
        raise ExportError(
            f"lm_head and model.embed_tokens share one weight (tie_word_embeddings) but hold {head_precision} and "
            f"{embed_precision}: give both the same precision (a rule like 'lm_head|model\\.embed_tokens')"
        )
    head_weight = head.dequantized_weight() if isinstance(head, QuantizedModule) else head.weight
    embed_weight = embed.dequantized_weight() if isinstance(embed, QuantizedModule) else embed.weight
    if not torch.equal(head_weight.detach().float(), embed_weight.detach().float()):
        raise ExportError("lm_head and model.embed_tokens are tied but hold different values (GPTQ rounding of the "
                          "head?); quantize both with round-to-nearest, or untie them")
    return True


def _write_hyperparameters(writer: object, config: object) -> None:
    hidden = int(_config_value(config, "hidden_size"))
    heads = int(_config_value(config, "num_attention_heads"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(int(_config_value(config, "max_position_embeddings")))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(_config_value(config, "num_hidden_layers")))
    writer.add_feed_forward_length(int(_config_value(config, "intermediate_size")))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(_config_value(config, "rms_norm_eps")))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(_config_value(config, "vocab_size")))


def _write_tokenizer(writer: object, tokenizer: object, vocab_size: int, pre: str | None) -> None:
    meta = gguf_tokenizer(tokenizer, vocab_size, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    writer.add_token_merges(meta.merges)
    for role, index in meta.special_ids.items():
        getattr(writer, f"add_{role}_token_id")(index)
    writer.add_add_bos_token(meta.add_bos)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)


def gguf_tensors(model: nn.Module) -> list[tuple[str, np.ndarray, object]]:
    """Every tensor of the GGUF file: ``(name, data, raw type)`` in llama.cpp's order."""
    config = _check_supported(model)
    arch = config.model_type
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    body = model.model
    tensors = [("token_embd.weight", *tensor_data(body.embed_tokens))]
    for index, block in enumerate(body.layers):
        modules = dict(block.named_modules())
        for source, target in BLOCK_TENSORS.items():
            module = modules[source]
            data, raw = tensor_data(module) if layer_kind(module) else (
                module.weight.detach().to(torch.float32).numpy(), None)
            if arch == "llama" and target in ("attn_q", "attn_k"):
                data = data[rotary_row_order(data.shape[0], heads if target == "attn_q" else kv_heads).numpy()]
            tensors.append((f"blk.{index}.{target}.weight", np.ascontiguousarray(data), raw))
            bias = getattr(module, "bias", None)
            if layer_kind(module) and isinstance(bias, Tensor):
                tensors.append((f"blk.{index}.{target}.bias", bias.detach().to(torch.float32).numpy(), None))
    tensors.append(("output_norm.weight", body.norm.weight.detach().to(torch.float32).numpy(), None))
    if not _tied_head(model, config):
        tensors.append(("output.weight", *tensor_data(model.lm_head)))
    return tensors


def write_gguf(model: nn.Module, path: Path, options: dict) -> None:
    """Write ``model`` (quantized or not) as one GGUF file at ``path``.

    Options: ``tokenizer`` (required: the model's Hugging Face tokenizer), ``gguf_pre``
    (llama.cpp's pre-tokenizer name; inferred only for plain GPT-2 byte-level BPE), ``name``.
    """
    gguf = _gguf()
    tokenizer = options.get("tokenizer")
    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from the file): "
                          "export(model, path, format='gguf', tokenizer=AutoTokenizer.from_pretrained(...))")
    tensors = gguf_tensors(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), config.model_type)
    try:
        writer.add_name(str(options.get("name") or getattr(config, "_name_or_path", "") or config.model_type))
        _write_hyperparameters(writer, config)
        _write_tokenizer(writer, tokenizer, int(config.vocab_size), options.get("gguf_pre"))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


GGUF = register(ExportFormat(
    name="gguf",
    description="llama.cpp / Ollama: one .gguf file (Llama- and Qwen2-style causal LMs)",
    nearest=nearest,
    write=write_gguf,
    options=("tokenizer", "gguf_pre", "name"),
))
