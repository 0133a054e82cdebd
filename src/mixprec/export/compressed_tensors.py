"""``format="compressed-tensors"``: a Hugging Face model folder that vLLM, SGLang and
transformers read (``config.json`` with a ``quantization_config``, ``model.safetensors``).

Each quantized Linear becomes a config group targeting its exact module names:

==============  ===================================================  =================
mixprec         weights                                              format
==============  ===================================================  =================
int8            int8 per output channel, symmetric; activations      int-quantized
                int8 per token, dynamic, symmetric
w8              int8 per output channel, weight-only                 pack-quantized
w8gN, w4gN      int8 / int4 in groups of N, symmetric, weight-only   pack-quantized
w4a8gN          int4 groups of N; activations int8 per token         pack-quantized
==============  ===================================================  =================

``pack-quantized`` stores codes ``c`` as ``u = c + 2**(bits-1)`` packed densely into int32
words, element ``i`` of a row in bits ``(i mod 32/bits) * bits`` upward of word
``i // (32/bits)``, with ``weight_shape`` beside them; ``int-quantized`` stores the int8
codes as they are. Scales are written as float32 holding mixprec's scales exactly (its
fp16 group scales widen exactly), so the reader's ``(codes) * scale`` in float32 is
mixprec's dequantized weight bit for bit. ``bf16`` / ``fp16`` Linears are stored as that
dtype and ``fp32`` ones as float32; all of them are listed in ``ignore``. Quantized
embeddings are refused (compressed-tensors quantizes Linear layers), and so is
``int8-static``, whose stored bias has the activation zero point folded in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mixprec.errors import ExportError
from mixprec.export.registry import ExportFormat, model_layers, register
from mixprec.formats import unpack_int4
from mixprec.nn import (
    Int8DynamicLinear,
    QuantizedModule,
    W4A8Linear,
    W4Linear,
    W8GroupLinear,
    W8Linear,
)

#: The per-token dynamic int8 activations of ``int8`` and ``w4a8``.
TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
              "group_size": None}


def nearest(kind: str, precision: str) -> str | None:
    """None when compressed-tensors holds ``precision`` for ``kind``, else the nearest held one."""
    if kind == "embedding":
        return None if precision in ("fp32", "bf16", "fp16") else "fp16 or bf16 (compressed-tensors quantizes Linears)"
    if precision in ("fp32", "bf16", "fp16", "int8", "w8") or precision.startswith(("w8g", "w4g", "w4a8g")):
        return None
    if precision == "int8-static":
        return "int8 (dynamic per-token activations)"
    return "int8"


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Signed ``codes [rows, columns]`` (int8, in ``[-2**(bits-1), 2**(bits-1))``) packed densely into
    int32 words ``[rows, columns * bits / 32]``: ``u = code + 2**(bits-1)``, element ``i`` in bits
    ``(i mod 32/bits) * bits`` of word ``i // (32/bits)`` (the words' bit patterns, read as int32)."""
    if bits not in (4, 8):
        raise ValueError(f"pack_int32 packs 4- or 8-bit codes, got {bits}")
    per_word = 32 // bits
    rows, columns = codes.shape
    if columns % per_word:
        raise ValueError(f"rows of {columns} codes do not fill whole int32 words of {per_word}")
    unsigned = (codes.to(torch.int64) + (1 << (bits - 1))).reshape(rows, columns // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _weight_args(bits: int, strategy: str, group_size: int | None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": False,
            "group_size": group_size}


def scheme_and_tensors(module: QuantizedModule) -> tuple[dict, dict[str, Tensor]]:
    """The compressed-tensors scheme (``weights``, ``input_activations``, ``format``) of one
    quantized Linear and its tensors (names local to the module)."""
    bias = getattr(module, "bias", None)
    tensors: dict[str, Tensor] = {} if bias is None else {"bias": bias.detach().to(torch.float32)}
    if isinstance(module, W4Linear):
        codes, scale, bits, group = unpack_int4(module.weight_packed, signed=True), module.weight_scale, 4, \
            module.group_size
        activations = TOKEN_INT8 if isinstance(module, W4A8Linear) else None
    elif isinstance(module, W8GroupLinear):
        codes, scale, bits, group, activations = module.weight, module.weight_scale, 8, module.group_size, None
    elif isinstance(module, W8Linear):
        codes, scale, bits, group, activations = module.weight, module.weight_scale.reshape(-1, 1), 8, None, None
    elif isinstance(module, Int8DynamicLinear):
        tensors.update(weight=module.weight_codes().clone(), weight_scale=module.weight_scale.reshape(-1, 1).clone())
        return {"weights": _weight_args(8, "channel", None), "input_activations": TOKEN_INT8,
                "format": "int-quantized"}, tensors
    else:
        raise ExportError(f"compressed-tensors cannot hold a {module.precision} layer ({type(module).__name__})")
    scheme = {"weights": _weight_args(bits, "group" if group else "channel", group), "input_activations": activations,
              "format": "pack-quantized"}
    tensors.update(weight_packed=pack_int32(codes, bits), weight_scale=scale.to(torch.float32),
                   weight_shape=torch.tensor(codes.shape, dtype=torch.int64))
    return scheme, tensors


def _check_model(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError(f"compressed-tensors export writes a Hugging Face model folder; {type(model).__name__} has "
                          "no transformers config (load the model with transformers' from_pretrained)")
    return config


def _tied_keys(model: nn.Module, config: object) -> set[str]:
    """Checkpoint keys the model re-ties on load (omitted from the file, as save_pretrained does);
    refuses a tie whose holders would load in different precisions."""
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return set()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return set()
    names = {module: name for name, module in model.named_modules()}
    head_precision, embed_precision = (getattr(m, "precision", "fp32") for m in (head, embed))
    if head_precision != embed_precision or head_precision != "fp32":
        raise ExportError(
            f"{names[head]!r} is tied to {names[embed]!r} (tie_word_embeddings) and transformers re-ties them on load, "
            f"so both must stay fp32 here (they hold {head_precision} and {embed_precision}); keep them fp32"
        )
    return {f"{names[head]}.weight"}


def write_compressed_tensors(model: nn.Module, folder: Path, options: dict) -> None:
    """Write ``model`` as a compressed-tensors folder into the empty ``folder``.
    Option ``tokenizer``: saved into the folder too when given."""
    config = _check_model(model)
    tied = _tied_keys(model, config)
    tensors: dict[str, Tensor] = {}
    groups: dict[str, tuple[dict, list[str]]] = {}
    ignore: list[str] = []
    covered: set[str] = set()
    for layer in model_layers(model):
        module = layer.module
        covered.update(f"{layer.name}.{key}" for key in module.state_dict())
        if layer.precision in ("fp32", "bf16", "fp16"):
            tensors.update({f"{layer.name}.{key}": value.detach() for key, value in module.state_dict().items()})
            if layer.kind == "linear":
                ignore.append(layer.name)
            continue
        scheme, local = scheme_and_tensors(module)
        tensors.update({f"{layer.name}.{key}": value for key, value in local.items()})
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, (scheme, []))[1].append(layer.name)
    for key, value in model.state_dict().items():
        if key not in covered and key not in tensors:
            tensors[key] = value.detach()
    for key in tied:
        tensors.pop(key, None)
    formats = {scheme["format"] for scheme, _ in groups.values()}
    quantization = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{index}": {**scheme, "targets": names, "output_activations": None}
                          for index, (scheme, names) in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    document = config.to_dict()
    document["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(folder)
    tokenizer = options.get("tokenizer")
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise ExportError(f"tokenizer must be a Hugging Face tokenizer (with save_pretrained), got "
                              f"{type(tokenizer).__name__}")
        tokenizer.save_pretrained(folder)


COMPRESSED_TENSORS = register(ExportFormat(
    name="compressed-tensors",
    description="vLLM / SGLang / transformers: a model folder with a compressed-tensors quantization_config",
    nearest=nearest,
    write=write_compressed_tensors,
    options=("tokenizer",),
    folder=True,
))
