"""Run a transformers BERT-family encoder on the real tokens of a padded batch only.

A padded batch of sentences spends most of its time in the linear layers, and those run row by
row: every pad token costs as much as a real one. :class:`PackedEncoder` drops the pad tokens
before the embeddings, runs the encoder on one packed sequence of the ``T`` real tokens (every
linear layer, LayerNorm and GELU sees ``[1, T, hidden]``), and lays the result back out as
``[batch, seq, hidden]`` with zeros at the pads. Attention, the one step that mixes tokens, gathers
each sentence's tokens back into a padded ``[batch, heads, seq, head_dim]`` block and masks the
pad keys, so no token attends across sentences.

Position ids are the ones the padded model would give each token (BERT and ELECTRA: its column;
RoBERTa, XLM-RoBERTa and CamemBERT: counted from ``pad_token_id + 1`` over the non-pad ids, as their
embeddings do), so left- and right-padded batches give what the padded model gives at every real
token. In eager mode the bits are the padded model's (tested in float32 for every supported family
and for ``int8``): every layer sees the same rows, and attention runs SDPA on the same padded block.
Layers that choose their kernel by row count (``w8`` / ``w8gN``: the few-row kernel up to 64 rows)
may take another kernel for ``T`` rows than for ``batch x seq``: float rounding only (4.8e-7 on a
tiny BERT).
Quantized linear layers whose activations are rounded per token (``int8``, ``w4a8``, weight-only) see
the rows they would in the padded batch; ``int8-asym`` and static activations use per-tensor ranges,
which no longer include the pad tokens' values.

Attention: inside ``torch.compile`` and for sequences of at most :data:`MATH_ATTENTION_MAX_SEQ`
tokens, a matmul / masked softmax / matmul that Inductor fuses (the CPU flash-attention kernel
took 0.9 ms a layer on a 32 x 14-token batch; compiled int8 all-MiniLM-L6-v2 on 32 STS-B sentences:
20.3 ms with the fused math, 25.6 ms with SDPA); otherwise ``scaled_dot_product_attention`` with
a boolean key mask (eager, and long sequences: 32 x 166 tokens 317 ms against 439 ms compiled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec.errors import InputError

ATTENTION_NAME = "mixprec_packed"
#: The encoders whose attention goes through transformers' attention interface with the keyword
#: arguments passed down, and whose padded position ids :func:`_padded_positions` reproduces.
COLUMN_POSITIONS = ("bert", "electra")
PAD_COUNTED_POSITIONS = ("roberta", "xlm-roberta", "camembert")
SUPPORTED_MODEL_TYPES = COLUMN_POSITIONS + PAD_COUNTED_POSITIONS
#: Longest padded sequence for which the compiled graph computes attention as fused math (the score
#: tensor is ``heads x batch x seq x seq`` float32); longer ones call scaled_dot_product_attention.
MATH_ATTENTION_MAX_SEQ = 64


def _packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: object) -> tuple[Tensor, None]:
    """transformers' attention interface for packed calls (``query`` ``[1, heads, T, head_dim]``);
    a call without the packing tensors (the model called directly) goes to transformers' SDPA."""
    index = kwargs.pop("mixprec_pack_index", None)
    if index is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    keep, real = kwargs.pop("mixprec_pack_keep"), kwargs.pop("mixprec_pack_real")
    assert isinstance(index, Tensor) and isinstance(keep, Tensor) and isinstance(real, Tensor)
    batch, seq = index.shape
    if torch.compiler.is_compiling() and seq <= MATH_ATTENTION_MAX_SEQ:
        q, k, v = (t[0][:, index] for t in (query, key, value))  # [heads, batch, seq, head_dim]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        scores = scores.masked_fill(~keep[None, :, None, :], torch.finfo(scores.dtype).min)
        context = torch.matmul(scores.softmax(-1), v).permute(1, 2, 0, 3)  # [batch, seq, heads, head_dim]
    else:
        q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))  # [batch, heads, seq, head_dim]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=scaling)
        context = context.transpose(1, 2)
    heads, head_dim = context.shape[2], context.shape[3]
    return context.reshape(batch * seq, heads, head_dim)[real].unsqueeze(0), None  # [1, T, heads, head_dim]


def _padded_positions(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The position ids ``[batch, seq]`` the model's embeddings give a padded batch."""
    if model.config.model_type in COLUMN_POSITIONS:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    embeddings = model.embeddings
    return embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # direct (padded) calls mask as SDPA does


class PackedEncoder(nn.Module):
    """Calls a transformers BERT-family base encoder (``model_type`` in :data:`SUPPORTED_MODEL_TYPES`,
    e.g. ``BertModel``, ``XLMRobertaModel``; float or quantized by mixprec, eager or ``torch.compile``-d)
    on the real tokens of padded batches only.

    ``PackedEncoder(model)(input_ids=..., attention_mask=..., token_type_ids=...)`` returns a
    ``BaseModelOutput`` whose ``last_hidden_state`` is ``[batch, seq, hidden]`` with zeros at the
    pad tokens (``attention_mask`` 0). Wrapping sets the model's attention implementation to
    ``"mixprec_packed"``, which runs transformers' SDPA attention when the model is called
    directly. Inference only: a model in training mode is refused.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = getattr(model, "_orig_mod", model)  # a torch.compile-d model: its original module
        config = getattr(inner, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(inner, "set_attn_implementation"):
            raise InputError(f"PackedEncoder runs transformers encoders of model_type {SUPPORTED_MODEL_TYPES}; got "
                             f"{type(inner).__name__} (model_type {model_type!r})")
        if not (hasattr(inner, "embeddings") and hasattr(inner, "encoder")):
            raise InputError(f"PackedEncoder runs base encoders (AutoModel: embeddings + encoder, returning "
                             f"last_hidden_state); {type(inner).__name__} is a task model: wrap its base model")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise InputError(f"PackedEncoder runs bidirectional encoders; this {type(inner).__name__} is configured "
                             "as a decoder (is_decoder / add_cross_attention): call it directly")
        _register()
        inner.set_attn_implementation(ATTENTION_NAME)
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        """The wrapped transformers model itself (the original module of a ``torch.compile``-d one)."""
        return getattr(self.model, "_orig_mod", self.model)

    @property
    def config(self) -> object:
        """The wrapped model's config (so that callers such as sentence-transformers' ``Transformer`` module,
        whose ``model`` may be replaced by a PackedEncoder, read it as before)."""
        return self.encoder.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                return_dict: bool = True) -> object:
        """``input_ids``, ``attention_mask`` (1 real token, 0 pad) and optional ``token_type_ids``:
        integer ``[batch, seq]`` on one device, every row with at least one real token. Returns a
        ``BaseModelOutput``, or the tuple ``(last_hidden_state,)`` with ``return_dict=False``."""
        from transformers.modeling_outputs import BaseModelOutput

        arguments = self.packed_arguments(input_ids, attention_mask, token_type_ids)
        packed = self.model(**arguments).last_hidden_state  # [1, T, hidden]
        hidden = packed.new_zeros(input_ids.numel(), packed.shape[-1])
        hidden[arguments["mixprec_pack_real"]] = packed[0]
        hidden = hidden.view(*input_ids.shape, -1)
        return BaseModelOutput(last_hidden_state=hidden) if return_dict else (hidden,)

    def packed_arguments(self, input_ids: Tensor, attention_mask: Tensor,
                         token_type_ids: Tensor | None = None) -> dict[str, Tensor]:
        """The wrapped model's keyword arguments for one packed call: ids, token types and position
        ids ``[1, T]`` of the real tokens, and the packing tensors its attention reads
        (``mixprec_pack_index`` ``[batch, seq]``: each padded slot's packed token, ``mixprec_pack_keep``:
        the mask as bool, ``mixprec_pack_real`` ``[T]``: the real tokens' flat padded positions)."""
        batch, seq = self._check(input_ids, attention_mask, token_type_ids)
        keep = attention_mask.bool()
        real = keep.flatten().nonzero().squeeze(1)
        index = torch.zeros(batch * seq, dtype=torch.long, device=input_ids.device)
        index[real] = torch.arange(real.numel(), device=input_ids.device)
        positions = _padded_positions(self.encoder, input_ids)
        token_types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        return {"input_ids": input_ids.flatten()[real].unsqueeze(0),
                "token_type_ids": token_types.flatten()[real].unsqueeze(0),
                "position_ids": positions.flatten()[real].unsqueeze(0),
                "mixprec_pack_index": index.view(batch, seq), "mixprec_pack_keep": keep, "mixprec_pack_real": real}

    def _check(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None) -> tuple[int, int]:
        if self.model.training:
            raise InputError("PackedEncoder is for inference: call model.eval() first")
        named = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            named["token_type_ids"] = token_type_ids
        for name, tensor in named.items():
            if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.is_floating_point() \
                    or tensor.is_complex() or tensor.dtype == torch.bool and name != "attention_mask":
                raise InputError(f"PackedEncoder: {name} must be an integer tensor [batch, seq], got "
                                 f"{getattr(tensor, 'dtype', type(tensor).__name__)} of shape "
                                 f"{tuple(getattr(tensor, 'shape', ()))}")
            if tensor.shape != input_ids.shape or tensor.device != input_ids.device:
                raise InputError(f"PackedEncoder: {name} is {tuple(tensor.shape)} on {tensor.device}; input_ids is "
                                 f"{tuple(input_ids.shape)} on {input_ids.device} (give every input the same shape "
                                 "and device)")
        if input_ids.numel() == 0:
            raise InputError(f"PackedEncoder: an empty batch {tuple(input_ids.shape)} (give at least one token)")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise InputError("PackedEncoder: attention_mask holds values other than 0 (pad) and 1 (real token)")
        empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"PackedEncoder: rows {empty[:8]} of attention_mask have no real token (drop them "
                             "from the batch)")
        return input_ids.shape[0], input_ids.shape[1]
