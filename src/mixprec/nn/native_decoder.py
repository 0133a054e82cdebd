"""Decode a Llama-family model quantized to ``w4a8gN``, ``int8`` and / or ``w4gN`` with one native call a step.

A decoding step of a PyTorch model pays for every operator it runs: about 300 a step for a 22-layer
Llama-shaped model, 7 ms of a 26 ms compiled step on a 2-core Zen 4 (BENCHMARKS.md), while its
weights stream from DRAM in about 20 ms. :class:`NativeLlamaDecoder` runs the whole decoder stack of a
model whose seven projections per layer are ``w4a8gN`` (the blocked layout), ``int8`` or ``w4gN``, in any mix,
in one C++ call (``csrc/llama_decode.cpp``): RMSNorm, the projections through the operators their modules call
(mixprec's quantize, ``w4a8``, ``w4`` and int8 kernels, oneDNN's for a packed int8 weight and many rows), rotary
positions, grouped-query attention over its own float32 KV cache, SiLU x up and the residual adds. The token
embedding and the head run as the model's own modules (any precision).

Each projection gives the bits its module gives for the same input rows; the float32 steps around them
round in another order than transformers' (the norms' means, attention sums), so logits agree with the
model's own forward to float rounding (2.4e-7 on random tiny models, tested), not bit for bit. On a trained
model such a difference can flip an int8 activation code, which later layers amplify: SmolLM2-135M
``w4a8g32`` moves as much when transformers' own input moves one ulp (``benchmarks/native_decoder_fidelity.py``).

Supported: ``model_type`` ``"llama"`` (SmolLM2, TinyLlama, Llama 2 / 3 and their rotary scalings: the cos/sin
tables come from the model's own rotary module), ``"mistral"`` (while ``max_length`` is within its sliding window)
and ``"qwen2"`` (Qwen2 / 2.5: biased q / k / v), SiLU MLP, projection biases or none, every
``q/k/v/o/gate/up/down_proj`` a :class:`~mixprec.nn.linear_weight_only.W4A8Linear` in the blocked layout
(``w4a8gN`` with N a multiple of 8), an ``int8`` :class:`~mixprec.nn.linear_int8.Int8DynamicLinear` (dense or
oneDNN-packed) or a ``w4gN`` :class:`~mixprec.nn.linear_weight_only.W4Linear` (float32 activations: no int8
rounding, so closer to the float model and slower from DRAM than ``w4a8gN``), and float32 norms. Anything else is
refused with what would fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mixprec.errors import InputError
from mixprec.heap import release_free_heap
from mixprec.kernels import native, weight_only
from mixprec.kernels.huge_pages import gather_in_huge_pages, zeros_in_huge_pages
from mixprec.kernels.int8_linear import PACKED_ROWS_MAX, dense_rows_max
from mixprec.nn.kv_cache import check_kv_config
from mixprec.nn.linear_int8 import Int8DynamicLinear, Int8PackedLinear
from mixprec.nn.linear_weight_only import W4A8Linear, W4Linear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
#: A policy pattern matching the seven projections of every decoder layer (what ``mixprec generate --precision`` sets).
PROJECTIONS_RULE = r"model\.layers\.\d+\.(" + "|".join(name.replace(".", r"\.") for name in PROJECTIONS) + ")"


#: transformers' model types whose decoder layer is Llama's (Mistral: a sliding window; Qwen2: q / k / v biases).
MODEL_TYPES = ("llama", "mistral", "qwen2")


def _supported_config(config: object) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise InputError(f"NativeLlamaDecoder runs Llama-family models (config.model_type one of {MODEL_TYPES}), got "
                         f"{model_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise InputError(f"NativeLlamaDecoder needs hidden_act 'silu', the model has {config.hidden_act!r}")
    if getattr(config, "pretraining_tp", 1) != 1:
        raise InputError(f"NativeLlamaDecoder needs pretraining_tp 1, got {config.pretraining_tp}")


def _check_window(config: object, layers: nn.Module, max_length: int) -> None:
    """Refuse a sliding attention window shorter than ``max_length``: the native attention sees every earlier token,
    which equals windowed attention only while no token is farther back than the window."""
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    if getattr(config, "model_type", None) == "mistral":
        windows.append(getattr(config, "sliding_window", None))
    shortest = min((w for w in windows if w is not None), default=None)
    if shortest is not None and max_length > shortest:
        raise InputError(f"the model attends through a sliding window of {shortest} tokens, which NativeLlamaDecoder "
                         f"does not apply: give max_length <= {shortest} (got {max_length})")


#: The precision families whose projection modules the native step runs (``w4a8gN``: N a multiple of 8).
NATIVE_FAMILIES = ("int8", "w4", "w4a8")

#: The kernels of csrc/llama_decode.cpp (its ``Kernel``).
W4A8_BLOCKED, INT8_DENSE, INT8_PACKED, W4_ROWS = 0, 1, 2, 3


def _projection_plan(layer: nn.Module, index: int, name: str) -> tuple[int, int, list[Tensor]]:
    """The kernel, the most rows its few-row path takes, and the five tensors of a projection: four the kernel reads
    (unused ones empty), then the float32 bias (empty: none)."""
    module = layer.get_submodule(name)
    empty = torch.empty(0)
    bias = getattr(module, "bias", None)
    bias = empty if bias is None else bias.detach()
    if isinstance(module, W4A8Linear) and module.blocked and native.w4a8_blocked_available():
        return W4A8_BLOCKED, 0, [module.codes_blocked, module.scale_blocked, empty, empty, bias]
    if isinstance(module, Int8PackedLinear):
        packed, unit_scale, zero_points, in_place = module.onednn_operands()
        return INT8_PACKED, PACKED_ROWS_MAX if in_place else 0, [packed, module.weight_scale, unit_scale,
                                                                 zero_points, bias]
    if type(module) is Int8DynamicLinear:
        return INT8_DENSE, dense_rows_max(module.weight), [module.weight, module.weight_scale, empty, empty, bias]
    if type(module) is W4Linear:  # w4_linear's two paths: the fused kernel, then tiles of the expanded weight
        tiles = torch.tensor([weight_only.tile_rows(module.out_features, module.in_features)])
        return W4_ROWS, weight_only.W4_ROWS_KERNEL_MAX_M, [module.weight_packed, module.weight_scale, tiles, empty,
                                                          bias]
    kind = type(module).__name__
    if isinstance(module, W4A8Linear):
        kind += "" if module.blocked else " (not blocked)"
        kind += "" if native.w4a8_blocked_available() else " (no w4a8 blocked kernel in this build: needs AVX2)"
    raise InputError(f"model.layers.{index}.{name} is {kind}; NativeLlamaDecoder needs every projection quantized to "
                     "int8, w4gN, or w4a8gN with N a multiple of 8 (the blocked layout), e.g. "
                     "Policy([(r'lm_head|model\\.embed_tokens', 'w8g32')], default='w4a8g32')")


def _gather_key(tensor: Tensor) -> tuple[int, torch.dtype, tuple[int, ...]] | None:
    """What makes a module's tensor and a decoder's tensor one and the same (None: not a movable tensor)."""
    if tensor.layout != torch.strided or not tensor.numel() or not tensor.is_contiguous():
        return None
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)


def _holders(layers: nn.Module) -> dict[tuple, list[tuple[dict[str, Tensor | None], str]]]:
    """Where ``layers``' modules hold each movable tensor (``_gather_key``): their parameter or buffer tables and
    the names in them."""
    holders: dict[tuple, list[tuple[dict[str, Tensor | None], str]]] = {}
    for module in layers.modules():
        for table in (module._parameters, module._buffers):
            for name in table:
                key = None if table[name] is None else _gather_key(table[name])
                if key is not None:
                    holders.setdefault(key, []).append((table, name))
    return holders


def _gather_held_tensors(layers: nn.Module, weights: list[Tensor]) -> None:
    """Moves every tensor of ``weights`` that one of ``layers``' modules holds as a parameter or buffer into huge
    pages, one after another in the order a step reads them (``gather_in_huge_pages``: the 1.17B Llama shape's step
    ran 1.02-1.04x faster so, ``benchmarks/huge_pages.py``), replacing it in ``weights`` and in every module holding
    it as soon as it is copied: the model and the decoder share the moved tensors, each original is freed before the
    next is copied, no memory is spent twice. Tensors that no module holds (oneDNN's packed weights, empty
    placeholders) stay as they are; values never change."""
    holders = _holders(layers)
    places: dict[tuple, list[int]] = {}  # each movable tensor's positions in weights, in the order first read
    for position, key in enumerate(_gather_key(tensor) for tensor in weights):
        if key in holders:
            places.setdefault(key, []).append(position)
    keys = list(places)
    moving = [weights[places[key][0]] for key in keys]

    def replaced(index: int, copy: Tensor) -> None:
        for position in places[keys[index]]:
            weights[position] = copy
        for table, name in holders[keys[index]]:
            held = table[name]
            if isinstance(held, nn.Parameter):
                held.data = copy
            else:
                table[name] = copy

    gather_in_huge_pages(moving, replaced)


def _norm_weight(module: nn.Module, name: str) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise InputError(f"{name} must be an RMSNorm with a float32 CPU weight, got {type(module).__name__}")
    return weight.detach().contiguous()


class NativeLlamaDecoder:
    """Step-by-step logits and generation (greedy or sampled) of a ``w4a8gN`` / ``int8`` / ``w4gN`` Llama-family
    model, one native call a step.

    ``max_length`` (tokens) sizes the KV cache, allocated once: float32 ``2 x layers x kv_heads x max_length x
    head_dim x 4`` bytes; with ``kv_bits`` (4 or 8) the codes, scales and zero points of up to ``max_length -
    kv_residual`` tokens and a float32 window of ``kv_residual + kv_group_size`` (:attr:`kv_cache_bytes`).
    :meth:`forward` appends tokens at :attr:`position` and returns their logits; :meth:`truncate` moves the position
    back (the cache beyond it is overwritten by later calls; a quantized cache cannot give back tokens it has turned
    into codes); :meth:`generate` decodes greedily or samples, up to an end token. The decoder holds the projection
    and norm tensors the model had when it was made: quantize or load the model again, and make a new decoder. Making
    it moves those tensors into huge pages, one after another in the order a step reads them, and gives the model's
    modules the moved tensors in their place (the same values; ``MIXPREC_HUGE_PAGES=0`` leaves them where they are).
    """

    def __init__(self, model: nn.Module, max_length: int, kv_bits: int | None = None, kv_group_size: int = 64,
                 kv_residual: int = 64) -> None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise InputError(f"max_length must be a positive int (tokens), got {max_length!r}")
        if kv_bits is not None:
            check_kv_config(kv_bits, kv_group_size, kv_residual)
        if not native.available():
            raise InputError(f"NativeLlamaDecoder needs mixprec's native kernels; here: {native.load_error()}")
        config = getattr(model, "config", None)
        _supported_config(config)
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(model, "lm_head"):
            raise InputError("NativeLlamaDecoder needs a transformers LlamaForCausalLM (model.model.layers, lm_head)")
        _check_window(config, layers, max_length)
        weights: list[Tensor] = []
        plans: list[int] = []
        for index, layer in enumerate(layers):
            weights.append(_norm_weight(layer.input_layernorm, f"model.layers.{index}.input_layernorm"))
            weights.append(_norm_weight(layer.post_attention_layernorm,
                                        f"model.layers.{index}.post_attention_layernorm"))
            for name in PROJECTIONS:
                kernel, few_rows_max, tensors = _projection_plan(layer, index, name)
                plans += [kernel, few_rows_max]
                weights += tensors
        self.model = model
        self.plans = plans
        _gather_held_tensors(layers, weights)
        release_free_heap()  # the originals of the gathered tensors (see mixprec.heap)
        self.weights = weights
        self.final_norm = _norm_weight(decoder.norm, "model.norm")
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.scaling = float(layers[0].self_attn.scaling)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        with torch.inference_mode():
            positions = torch.arange(max_length).unsqueeze(0)
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = decoder.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self.kv_bits, self.kv_group_size, self.kv_residual = kv_bits, kv_group_size, kv_residual
        self._max_length = max_length
        self.kv_value_group: int | None = None
        if kv_bits is None:
            cache_shape = (len(layers), self.kv_heads, max_length, head_dim)
            self.kv_cache = [zeros_in_huge_pages(cache_shape, torch.float32) for _ in range(2)]  # keys, values
        else:
            self.kv_value_group = min(kv_group_size, head_dim)
            if head_dim % self.kv_value_group:
                raise InputError(f"kv_group_size {kv_group_size} does not divide head_dim {head_dim}: give a divisor "
                                 f"of {head_dim} or a multiple of it")
            self.kv_cache = _quantized_kv_cache(len(layers), self.kv_heads, head_dim, max_length, kv_bits,
                                                kv_group_size, kv_residual, self.kv_value_group)
        self.position = 0

    @property
    def max_length(self) -> int:
        """The most tokens the KV cache holds."""
        return self._max_length

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds, allocated for :attr:`max_length` tokens."""
        return sum(t.nbytes for t in self.kv_cache)

    @property
    def quantized_tokens(self) -> int:
        """Tokens the quantized KV cache holds as codes (0 for a float32 cache)."""
        return 0 if self.kv_bits is None else int(self.kv_cache[-1][0])

    def truncate(self, length: int) -> None:
        """Forget every token from position ``length`` on: 0 <= length <= :attr:`position`, and with a quantized
        cache either 0 or at least :attr:`quantized_tokens` (codes cannot be turned back into the float keys)."""
        if not isinstance(length, int) or not 0 <= length <= self.position:
            raise InputError(f"length must be an int in [0, {self.position}] (the tokens held), got {length!r}")
        if 0 < length < self.quantized_tokens:
            raise InputError(f"the KV cache holds tokens [0, {self.quantized_tokens}) as codes; truncate to 0 or to "
                             f"a length in [{self.quantized_tokens}, {self.position}], got {length}")
        if length == 0 and self.kv_bits is not None:
            self.kv_cache[-1].zero_()
        self.position = length

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[tokens, vocab]`` (float32) of ``input_ids`` (a 1-D int64 tensor of token ids, or ``[1, tokens]``)
        placed at positions ``[position, position + tokens)``; the position then advances past them. A step that fails
        inside the native call (keys or values that are NaN or Inf, which a quantized cache cannot hold) empties a
        quantized cache (position 0) before the error propagates."""
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be an int64 tensor of token ids, got {type(input_ids).__name__} "
                             f"{getattr(input_ids, 'dtype', '')}")
        ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
        if ids.dim() != 1 or ids.numel() == 0:
            raise InputError(f"input_ids must be [tokens] or [1, tokens] with tokens >= 1, "
                             f"got {tuple(input_ids.shape)}")
        vocab = int(self.model.config.vocab_size)
        low, high = (int(bound) for bound in torch.aminmax(ids))
        if low < 0 or high >= vocab:
            raise InputError(f"token ids must lie in [0, {vocab}) (the model's vocabulary), got ids from {low} to "
                             f"{high}")
        if self.position + ids.numel() > self.max_length:
            raise InputError(f"{ids.numel()} tokens at position {self.position} exceed max_length {self.max_length}; "
                             "make a decoder with a larger max_length or truncate()")
        with torch.inference_mode():
            hidden = self.model.model.embed_tokens(ids.long()).float().contiguous()
            if self.kv_bits is None:
                out = native.llama_decode_layers(hidden, self.weights, self.plans, self.final_norm, self.cos,
                                                 self.sin, *self.kv_cache, self.position, self.heads, self.kv_heads,
                                                 self.intermediate, self.eps, self.scaling)
            else:
                try:
                    out = native.llama_decode_layers_quantized_kv(
                        hidden, self.weights, self.plans, self.final_norm, self.cos, self.sin, self.kv_cache,
                        self.position, self.heads, self.kv_heads, self.intermediate, self.eps, self.scaling,
                        self.kv_bits, self.kv_group_size, self.kv_residual, self.kv_value_group)
                except RuntimeError:
                    self.truncate(0)  # layers the step reached may hold more tokens as codes than the others
                    raise
            logits = self.model.lm_head(out).float()
        self.position += ids.numel()
        return logits

    __call__ = forward

    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 streamer: Callable[[int], object] | None = None) -> Tensor:
        """The prompt's continuation: ``input_ids`` placed from position 0, then up to ``max_new_tokens`` tokens one
        step each, stopping after the first one in ``eos_token_id`` (that token is returned too). ``temperature`` 0:
        greedy (the argmax; the first of tied logits); > 0: each token drawn from ``softmax(logits / temperature)``
        over the ``top_k`` largest logits (every token if None) with ``generator`` (``torch.multinomial``).
        ``streamer`` is called with each new token id as soon as it is chosen. Returns the new token ids, int64
        ``[tokens]``."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        stop = self._stop_tokens(eos_token_id)
        check_sampling(temperature, top_k, int(self.model.config.vocab_size))
        self.truncate(0)
        logits = self.forward(input_ids)
        tokens: list[Tensor] = []
        while True:
            token = _next_token(logits[-1], temperature, top_k, generator)
            tokens.append(token)
            if streamer is not None:
                streamer(int(token))
            if len(tokens) == max_new_tokens or int(token) in stop:
                return torch.cat(tokens)
            logits = self.forward(token)

    def _stop_tokens(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        vocab = int(self.model.config.vocab_size)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise InputError(f"eos_token_id must be a token id or a sequence of them in [0, {vocab}), got "
                             f"{eos_token_id!r}")
        return set(ids)


def _quantized_kv_cache(layers: int, kv_heads: int, head_dim: int, max_length: int, bits: int, group: int,
                        residual: int, value_group: int) -> list[Tensor]:
    """The nine tensors of csrc/kv_cache_store.h: codes for up to ``max_length - residual`` tokens (whole chunks),
    their scales and zero points, the float32 window, the tokens held as codes per layer."""
    capacity = max(0, max_length - residual) // group * group
    row_bytes = head_dim * bits // 8
    heads = (layers, kv_heads)
    return [zeros_in_huge_pages((*heads, capacity, row_bytes), torch.uint8),
            torch.zeros(*heads, capacity // group, head_dim, dtype=torch.float16),
            torch.zeros(*heads, capacity // group, head_dim, dtype=torch.uint8),
            zeros_in_huge_pages((*heads, capacity, row_bytes), torch.uint8),
            torch.zeros(*heads, capacity, head_dim // value_group, dtype=torch.float16),
            torch.zeros(*heads, capacity, head_dim // value_group, dtype=torch.uint8),
            torch.zeros(*heads, residual + group, head_dim), torch.zeros(*heads, residual + group, head_dim),
            torch.zeros(layers, dtype=torch.int64)]


def check_sampling(temperature: float, top_k: int | None, vocab: int) -> None:
    """Refuse a temperature that is not a finite number >= 0 (0: greedy), a ``top_k`` outside ``[1, vocab]``, and a
    ``top_k`` without sampling."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise InputError(f"top_k must be None or an int in [1, {vocab}] (the vocabulary), got {top_k!r}")
    if top_k is not None and temperature == 0:
        raise InputError("top_k limits sampling; with temperature 0 decoding is greedy: give a temperature > 0")


def _next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One token id (int64 ``[1]``) from a row of logits: the argmax at temperature 0, else a draw (see generate)."""
    if temperature == 0:
        return logits.argmax().reshape(1)
    scaled = logits / temperature
    if top_k is None:
        return torch.multinomial(scaled.softmax(-1), 1, generator=generator)
    values, indices = scaled.topk(top_k)
    return indices[torch.multinomial(values.softmax(-1), 1, generator=generator)]
