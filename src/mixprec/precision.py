"""Precision names and the quantized module each one builds.

Names (used in Python, TOML and the CLI):

=============  =====================================================  ===========
name           meaning                                                 applies to
=============  =====================================================  ===========
fp32           unchanged                                               all
bf16, fp16     weights (and bias) stored and computed in half          Linear, Embedding
int8           Linear: int8 weights per output channel (symmetric),    Linear, Embedding
               int8 activations per token (dynamic, symmetric),
               int8 x int8 GEMM, int32 accumulation.
               Embedding: uint8 row-wise asymmetric table.
int8-static    int8 weights per channel, activations per tensor with   Linear
               calibrated asymmetric parameters
int8-tensor    the seed project's dynamic symmetric per-tensor fake    Linear
               quantization (baseline)
w8             int8 weight-only, per output channel                    Linear
w8gN           int8 weight-only in groups of N along the input          Linear, Embedding
               (symmetric, fp16 scale per group; N = 32 is llama.cpp's
               Q8_0 block)
w4, w4gN       int4 weight-only in groups of N (Linear default 32;     Linear, Embedding
               Embedding ``w4`` is row-wise, asymmetric)
w4a8, w4a8gN   int4 weights in groups of N (default 32, N a multiple    Linear
               of 4) as ``w4``; activations int8 per token (dynamic,
               symmetric, as ``int8``); int4 x int8 VNNI GEMM
=============  =====================================================  ===========

"Linear" includes GPT-2-style ``Conv1D`` layers of ``transformers`` (``y = x @ W + b``
with ``W`` stored ``[in, out]``): they are quantized through a Linear view of the
transposed weight and replaced by the same modules as ``nn.Linear``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from mixprec.errors import PolicyError
from mixprec.formats import QParams
from mixprec.kernels import MAX_REDUCTION
from mixprec.nn import (
    HalfEmbedding,
    HalfLinear,
    Int8Embedding,
    Int8StaticLinear,
    Int8TensorFakeQuantLinear,
    QuantizedModule,
    W4A8Linear,
    W4Embedding,
    W4Linear,
    W8GroupEmbedding,
    W8GroupLinear,
    W8Linear,
    int8_dynamic_class,
)

#: Families whose Linear runs an int8 x int8 GEMM with int32 accumulation.
INT8_GEMM_FAMILIES = ("int8", "int8-static")
FAMILIES = ("fp32", "bf16", "fp16", "int8", "int8-static", "int8-tensor", "w8", "w4", "w4a8")
#: Families that store int4 codes in groups along the input dimension.
GROUPED_FAMILIES = ("w4", "w4a8")
LINEAR_FAMILIES = FAMILIES
EMBEDDING_FAMILIES = ("fp32", "bf16", "fp16", "int8", "w4", "w8")
#: Group size of ``w4`` and ``w4a8`` on a Linear.
DEFAULT_LINEAR_GROUP = 32
_GROUPED = re.compile(r"(w4|w4a8|w8)g([0-9]+)")


@dataclass(frozen=True)
class Precision:
    """A parsed precision name: its family and, for ``w4gN`` / ``w4a8gN`` / ``w8gN``, the group size."""

    family: str
    group_size: int | None = None

    @property
    def name(self) -> str:
        return f"{self.family}g{self.group_size}" if self.group_size is not None else self.family

    @property
    def is_static(self) -> bool:
        return self.family == "int8-static"


def valid_names() -> str:
    """Human-readable list of valid precision names."""
    return (", ".join(FAMILIES) + ", w4gN (N an even group size, e.g. w4g128), w4a8gN (N a multiple of 4), "
            "w8gN (N even, e.g. w8g32)")


def parse_precision(name: object) -> Precision:
    """Parse a precision name, raising PolicyError with the valid names if unknown."""
    if isinstance(name, Precision):
        return name
    if not isinstance(name, str):
        raise PolicyError(f"precision must be a string, got {type(name).__name__}; valid: {valid_names()}")
    if name in FAMILIES:
        return Precision(name)
    match = _GROUPED.fullmatch(name)
    if match:
        family, group = match.group(1), int(match.group(2))
        if group < 2 or group % 2:
            raise PolicyError(f"precision {name!r}: the group size must be even and >= 2")
        if family == "w4a8" and group % 4:
            raise PolicyError(f"precision {name!r}: w4a8 multiplies 4 codes at a time, so its group size must be "
                              f"a multiple of 4 (e.g. {name[:-len(str(group))]}{group + 4 - group % 4})")
        return Precision(family, group)
    raise PolicyError(f"unknown precision {name!r}; valid: {valid_names()}")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2-style ``Conv1D`` (``transformers.pytorch_utils``), found
    by shape rather than by import so that mixprec does not need ``transformers``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def as_linear(module: nn.Module) -> nn.Module:
    """``module`` itself, or for a ``Conv1D`` an ``nn.Linear`` sharing its (transposed) weight and bias."""
    if not is_conv1d(module):
        return module
    linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a GPT-2-style ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def quantizable(module: nn.Module) -> bool:
    """Whether mixprec knows how to replace this module."""
    return (is_linear(module) or isinstance(module, nn.Embedding)) and not isinstance(module, QuantizedModule)


def in_features(module: nn.Module) -> int:
    """Input width of a Linear-like layer."""
    return as_linear(module).in_features


def _features(module: nn.Module) -> int:
    return in_features(module) if is_linear(module) else module.embedding_dim


def check_applicable(name: str, module: nn.Module, precision: Precision) -> None:
    """Raise PolicyError if ``precision`` cannot be applied to ``module``."""
    kind = type(module).__name__
    families = LINEAR_FAMILIES if is_linear(module) else EMBEDDING_FAMILIES
    if precision.family not in families:
        raise PolicyError(
            f"precision {precision.name!r} is not valid for layer {name!r} ({kind}); "
            f"valid for {kind}: {', '.join(families)}"
        )
    if isinstance(module, nn.Embedding) and precision.family == "w8" and precision.group_size is None:
        raise PolicyError(f"embedding {name!r}: int8 weight-only tables come in groups (w8gN, e.g. w8g32); "
                          "or use int8 (row-wise asymmetric)")
    group = group_size_for(module, precision)
    features = _features(module)
    if group is not None and features % group:
        divisors = [d for d in range(2, features + 1, 2) if features % d == 0]
        raise PolicyError(
            f"group size {group} does not divide the {features} input features of layer {name!r}; "
            f"group sizes that do: {', '.join(map(str, divisors[:10])) or 'none (odd width)'}"
        )
    if is_linear(module) and precision.family in INT8_GEMM_FAMILIES and features > MAX_REDUCTION:
        raise PolicyError(
            f"layer {name!r} has {features} input features; {precision.name!r} accumulates int8 products "
            f"in int32, which is proven overflow-free only up to {MAX_REDUCTION}: use w8 or a float precision"
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None and precision.family != "fp32":
        raise PolicyError(f"embedding {name!r} uses max_norm, which a frozen low-precision table cannot honour")


def group_size_for(module: nn.Module, precision: Precision) -> int | None:
    """Effective group size: Linear ``w4``/``w4a8`` -> 32, Embedding ``w4`` -> whole row;
    ``w8gN`` -> N, per-channel ``w8`` -> None."""
    if precision.family == "w8":
        return precision.group_size
    if precision.family not in GROUPED_FAMILIES:
        return None
    if precision.group_size is not None:
        return precision.group_size
    return DEFAULT_LINEAR_GROUP if is_linear(module) else module.embedding_dim


def built_name(module: nn.Module, precision: Precision) -> str:
    """The precision name the built layer carries: a Linear's ``w4`` / ``w4a8`` is ``w4g32`` /
    ``w4a8g32``; every other name is kept as written."""
    group = group_size_for(module, precision) if is_linear(module) else None
    return precision.name if group is None or precision.group_size else f"{precision.family}g{group}"


def has_integer_weights(module: nn.Module, precision: Precision) -> bool:
    """Whether ``precision`` stores this Linear's weight as integer codes (GPTQ applies)."""
    return is_linear(module) and precision.family in ("int8", "int8-static", "int8-tensor", "w8", *GROUPED_FAMILIES)


def build(module: nn.Module, precision: Precision, input_qparams: QParams | None = None,
          hessian: Tensor | None = None) -> nn.Module:
    """Quantize a float ``nn.Linear``/``nn.Embedding`` into the module for ``precision``.

    ``hessian`` (Linear layers with integer weights only) selects GPTQ weight rounding.
    """
    family = precision.family
    if family == "fp32":
        return module
    module = as_linear(module)
    if isinstance(module, nn.Embedding):
        if family in ("bf16", "fp16"):
            return HalfEmbedding.from_float(module, family)
        if family == "int8":
            return Int8Embedding.from_float(module)
        if family == "w8":
            return W8GroupEmbedding.from_float(module, precision.group_size)
        return W4Embedding.from_float(module, precision.group_size)
    if family in ("bf16", "fp16"):
        return HalfLinear.from_float(module, family)
    if family == "int8":
        return int8_dynamic_class(module.in_features, module.out_features).from_float(module, hessian)
    if family == "int8-static":
        if input_qparams is None:
            raise PolicyError("int8-static needs calibrated input parameters")
        return Int8StaticLinear.from_float(module, input_qparams, hessian)
    if family == "int8-tensor":
        return Int8TensorFakeQuantLinear.from_float(module, hessian)
    if family == "w8" and precision.group_size is not None:
        return W8GroupLinear.from_float(module, precision.group_size, hessian)
    if family == "w8":
        return W8Linear.from_float(module, hessian)
    if family == "w4a8":
        return W4A8Linear.from_float(module, group_size_for(module, precision), hessian)
    return W4Linear.from_float(module, group_size_for(module, precision), hessian)


def build_empty(module: nn.Module, precision: Precision) -> nn.Module:
    """The quantized module for ``precision`` with placeholder storage of the right shapes."""
    family = precision.family
    if family == "fp32":
        return module
    module = as_linear(module)
    if isinstance(module, nn.Embedding):
        rows, dim = module.num_embeddings, module.embedding_dim
        if family in ("bf16", "fp16"):
            return HalfEmbedding(rows, dim, family)
        if family == "int8":
            return Int8Embedding(rows, dim)
        if family == "w8":
            return W8GroupEmbedding(rows, dim, precision.group_size)
        return W4Embedding(rows, dim, precision.group_size)
    shape = (module.in_features, module.out_features, module.bias is not None)
    if family in ("bf16", "fp16"):
        return HalfLinear(*shape, fmt=family)
    if family in GROUPED_FAMILIES:
        module_class = W4A8Linear if family == "w4a8" else W4Linear
        return module_class(*shape, group_size=group_size_for(module, precision))
    if family == "w8" and precision.group_size is not None:
        return W8GroupLinear(*shape, group_size=precision.group_size)
    classes: dict[str, type[nn.Module]] = {
        "int8": int8_dynamic_class(module.in_features, module.out_features),
        "int8-static": Int8StaticLinear,
        "int8-tensor": Int8TensorFakeQuantLinear,
        "w8": W8Linear,
    }
    return classes[family](*shape)
