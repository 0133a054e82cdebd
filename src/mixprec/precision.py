"""Precision names and the quantized module each one builds.

Names (used in Python, TOML and the CLI):

=============  =====================================================  ===================
name           meaning                                                 applies to
=============  =====================================================  ===================
fp32           unchanged                                               all
bf16, fp16     weights (and bias) stored and computed in half          Linear, Embedding,
                                                                       Conv
int8           Linear: int8 weights per output channel (symmetric),    Linear, Embedding,
               int8 activations per token (dynamic, symmetric),        Conv
               int8 x int8 GEMM, int32 accumulation.
               Embedding: uint8 row-wise asymmetric table.
               Conv: int8 weights per output channel, uint8
               activations per tensor (dynamic, asymmetric).
int8-static    int8 weights per channel, activations per tensor with   Linear, Conv
               calibrated asymmetric parameters
int8-asym      int8 weights per channel, activations per tensor with   Linear
               dynamic asymmetric parameters (ONNX Runtime's and
               PyTorch's dynamic quantization)
int8-tensor    the seed project's dynamic symmetric per-tensor fake    Linear
               quantization (baseline)
w8             int8 weight-only, per output channel                    Linear, Conv
w8gN           int8 weight-only in groups of N along the input          Linear, Embedding
               (symmetric, fp16 scale per group; N = 32 is llama.cpp's
               Q8_0 block)
w4, w4gN       int4 weight-only in groups of N (Linear default 32;     Linear, Embedding,
               Embedding ``w4`` is row-wise, asymmetric; Conv ``w4``   Conv
               is one group per output channel's window)
w4a8, w4a8gN   int4 weights in groups of N (default 32, N a multiple    Linear
               of 4) as ``w4``; activations int8 per token (dynamic,
               symmetric, as ``int8``); int4 x int8 VNNI GEMM
=============  =====================================================  ===================

"Linear" includes GPT-2-style ``Conv1D`` layers of ``transformers`` (``y = x @ W + b``
with ``W`` stored ``[in, out]``): they are quantized through a Linear view of the
transposed weight and replaced by the same modules as ``nn.Linear``. "Conv" is
``nn.Conv1d`` and ``nn.Conv2d`` (any stride, padding, dilation, groups); their groups run
along an output channel's window of ``in_channels / groups x kernel`` weights.

Each layer kind is one :class:`LayerKind` in :data:`LAYER_KINDS`: which float modules it
takes and, per precision family, how the quantized module is built from one (and built
empty, for loading). The functions below only parse names and look the kind up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from mixprec.errors import PolicyError
from mixprec.formats import QParams
from mixprec.kernels import MAX_REDUCTION
from mixprec.kernels.int8_conv import MAX_CONV_REDUCTION
from mixprec.nn import (
    HalfConv,
    HalfEmbedding,
    HalfLinear,
    Int8Conv,
    Int8Embedding,
    Int8StaticConv,
    Int8TensorFakeQuantLinear,
    QuantizedModule,
    W4A8Linear,
    W4Conv,
    W4Embedding,
    W4Linear,
    W8Conv,
    W8GroupEmbedding,
    W8GroupLinear,
    W8Linear,
    int8_asym_class,
    int8_dynamic_class,
    int8_static_class,
)
from mixprec.nn.conv_layout import ConvLayout, is_conv

#: Families whose layers run an int8 x int8 product with int32 accumulation.
INT8_GEMM_FAMILIES = ("int8", "int8-static", "int8-asym")
FAMILIES = ("fp32", "bf16", "fp16", "int8", "int8-static", "int8-asym", "int8-tensor", "w8", "w4", "w4a8")
#: Families that store int4 codes in groups.
GROUPED_FAMILIES = ("w4", "w4a8")
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

    @property
    def key(self) -> str:
        """The builder this precision uses within its family (``w8`` per channel or ``w8g`` grouped)."""
        return "w8g" if self.family == "w8" and self.group_size is not None else self.family


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


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2-style ``Conv1D`` (``transformers.pytorch_utils``, a Linear with
    its weight stored ``[in, out]``; not ``nn.Conv1d``), found by shape rather than by import so
    that mixprec does not need ``transformers``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def as_linear(module: nn.Module) -> nn.Module:
    """``module`` itself, or for a ``Conv1D`` an ``nn.Linear`` sharing its (transposed) weight and bias."""
    if not is_gpt2_conv1d(module):
        return module
    linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a GPT-2-style ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def in_features(module: nn.Module) -> int:
    """Input width of a Linear-like layer."""
    return as_linear(module).in_features


Build = Callable[[nn.Module, Precision, "QParams | None", "Tensor | None"], nn.Module]
BuildEmpty = Callable[[nn.Module, Precision], nn.Module]


@dataclass(frozen=True)
class LayerKind:
    """A kind of float layer mixprec replaces and, per precision (:attr:`Precision.key`), the two
    ways of building its quantized module: from the float layer ``(module, precision,
    input_qparams, hessian)`` and empty with the right shapes ``(module, precision)``."""

    name: str
    matches: Callable[[nn.Module], bool]
    builders: Mapping[str, tuple[Build, BuildEmpty]]
    #: Elements along which weight groups run (a Linear's input, a table's row, a conv's window).
    group_axis: Callable[[nn.Module], int]
    #: Group of ``w4`` / ``w4a8`` written without a size.
    default_group: Callable[[nn.Module], int]
    #: Longest reduction an int8 x int8 product of this kind proves free of int32 overflow.
    max_reduction: int
    #: Families that take GPTQ weight rounding.
    gptq_families: tuple[str, ...] = ()

    @property
    def families(self) -> tuple[str, ...]:
        return tuple("w8gN" if key == "w8g" else key for key in ("fp32", *self.builders))

    def takes(self, precision: Precision) -> bool:
        return precision.family == "fp32" or precision.key in self.builders


def _linear_group(module: nn.Module, precision: Precision) -> int:
    return precision.group_size or DEFAULT_LINEAR_GROUP


def _shape(module: nn.Module) -> tuple[int, int, bool]:
    return module.in_features, module.out_features, module.bias is not None


def _int8_linear_empty(module: nn.Module, _precision: Precision) -> nn.Module:
    return int8_dynamic_class(module.in_features, module.out_features)(*_shape(module))


def _static_linear(module: nn.Module, _precision: Precision, qparams: QParams | None, hessian: Tensor | None):  # noqa: ANN202
    if qparams is None:
        raise PolicyError("int8-static needs calibrated input parameters")
    return int8_static_class(module.in_features, module.out_features).from_float(module, qparams, hessian)


def _static_conv(module: nn.Module, _precision: Precision, qparams: QParams | None, _hessian: Tensor | None):  # noqa: ANN202
    if qparams is None:
        raise PolicyError("int8-static needs calibrated input parameters")
    return Int8StaticConv.from_float(module, qparams)


LINEAR = LayerKind(
    name="Linear",
    matches=is_linear,
    builders={
        "bf16": (lambda m, p, q, h: HalfLinear.from_float(m, p.family), lambda m, p: HalfLinear(*_shape(m), p.family)),
        "fp16": (lambda m, p, q, h: HalfLinear.from_float(m, p.family), lambda m, p: HalfLinear(*_shape(m), p.family)),
        "int8": (lambda m, p, q, h: int8_dynamic_class(m.in_features, m.out_features).from_float(m, h),
                 _int8_linear_empty),
        "int8-static": (_static_linear, lambda m, p: int8_static_class(m.in_features, m.out_features)(*_shape(m))),
        "int8-asym": (lambda m, p, q, h: int8_asym_class(m.in_features, m.out_features).from_float(m, h),
                      lambda m, p: int8_asym_class(m.in_features, m.out_features)(*_shape(m))),
        "int8-tensor": (lambda m, p, q, h: Int8TensorFakeQuantLinear.from_float(m, h),
                        lambda m, p: Int8TensorFakeQuantLinear(*_shape(m))),
        "w8": (lambda m, p, q, h: W8Linear.from_float(m, h), lambda m, p: W8Linear(*_shape(m))),
        "w8g": (lambda m, p, q, h: W8GroupLinear.from_float(m, p.group_size, h),
                lambda m, p: W8GroupLinear(*_shape(m), group_size=p.group_size)),
        "w4": (lambda m, p, q, h: W4Linear.from_float(m, _linear_group(m, p), h),
               lambda m, p: W4Linear(*_shape(m), group_size=_linear_group(m, p))),
        "w4a8": (lambda m, p, q, h: W4A8Linear.from_float(m, _linear_group(m, p), h),
                 lambda m, p: W4A8Linear(*_shape(m), group_size=_linear_group(m, p))),
    },
    group_axis=in_features,
    default_group=lambda m: DEFAULT_LINEAR_GROUP,
    max_reduction=MAX_REDUCTION,
    gptq_families=("int8", "int8-static", "int8-asym", "int8-tensor", "w8", *GROUPED_FAMILIES),
)


def _table(module: nn.Module) -> tuple[int, int]:
    return module.num_embeddings, module.embedding_dim


EMBEDDING = LayerKind(
    name="Embedding",
    matches=lambda m: isinstance(m, nn.Embedding),
    builders={
        "bf16": (lambda m, p, q, h: HalfEmbedding.from_float(m, p.family), lambda m, p: HalfEmbedding(*_table(m),
                                                                                                      p.family)),
        "fp16": (lambda m, p, q, h: HalfEmbedding.from_float(m, p.family), lambda m, p: HalfEmbedding(*_table(m),
                                                                                                      p.family)),
        "int8": (lambda m, p, q, h: Int8Embedding.from_float(m), lambda m, p: Int8Embedding(*_table(m))),
        "w4": (lambda m, p, q, h: W4Embedding.from_float(m, p.group_size),
               lambda m, p: W4Embedding(*_table(m), p.group_size)),
        "w8g": (lambda m, p, q, h: W8GroupEmbedding.from_float(m, p.group_size),
                lambda m, p: W8GroupEmbedding(*_table(m), p.group_size)),
    },
    group_axis=lambda m: m.embedding_dim,
    default_group=lambda m: m.embedding_dim,
    max_reduction=0,
)

CONV = LayerKind(
    name="Conv",
    matches=is_conv,
    builders={
        "bf16": (lambda m, p, q, h: HalfConv.from_float(m, p.family), lambda m, p: HalfConv(ConvLayout.of(m),
                                                                                           p.family)),
        "fp16": (lambda m, p, q, h: HalfConv.from_float(m, p.family), lambda m, p: HalfConv(ConvLayout.of(m),
                                                                                           p.family)),
        "int8": (lambda m, p, q, h: Int8Conv.from_float(m), lambda m, p: Int8Conv(ConvLayout.of(m))),
        "int8-static": (_static_conv, lambda m, p: Int8StaticConv(ConvLayout.of(m))),
        "w8": (lambda m, p, q, h: W8Conv.from_float(m), lambda m, p: W8Conv(ConvLayout.of(m), "w8")),
        "w4": (lambda m, p, q, h: W4Conv.from_float(m, p.group_size),
               lambda m, p: W4Conv(ConvLayout.of(m), p.group_size)),
    },
    group_axis=lambda m: ConvLayout.of(m).window,
    default_group=lambda m: ConvLayout.of(m).window,
    max_reduction=MAX_CONV_REDUCTION,
)

#: Every kind of layer mixprec replaces, in the order they are tried.
LAYER_KINDS = (LINEAR, EMBEDDING, CONV)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a float layer mixprec can replace, or None."""
    if isinstance(module, QuantizedModule):
        return None
    return next((kind for kind in LAYER_KINDS if kind.matches(module)), None)


def quantizable(module: nn.Module) -> bool:
    """Whether mixprec knows how to replace this module."""
    return kind_of(module) is not None


def _kind(module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    if kind is None:
        raise PolicyError(f"mixprec does not quantize {type(module).__name__} layers; it takes "
                          f"{', '.join(k.name for k in LAYER_KINDS)} (nn.Conv1d, nn.Conv2d)")
    return kind


def check_applicable(name: str, module: nn.Module, precision: Precision) -> None:
    """Raise PolicyError if ``precision`` cannot be applied to ``module``."""
    kind = _kind(module)
    type_name = type(module).__name__
    if not kind.takes(precision):
        hint = ""
        if kind is EMBEDDING and precision.family == "w8":
            hint = "; int8 weight-only tables come in groups (w8gN, e.g. w8g32), or use int8 (row-wise asymmetric)"
        elif kind is CONV and precision.key == "w8g":
            hint = "; a convolution's int8 weights are per output channel: use w8"
        raise PolicyError(
            f"precision {precision.name!r} is not valid for layer {name!r} ({type_name}); "
            f"valid for {type_name}: {', '.join(kind.families)}{hint}"
        )
    group = group_size_for(module, precision)
    features = kind.group_axis(module)
    what = "weights in its window (in_channels / groups x kernel)" if kind is CONV else "input features"
    if group is not None and features % group:
        divisors = [d for d in range(2, features + 1, 2) if features % d == 0]
        per_channel = "; or w4, one group per output channel" if kind is CONV else ""
        raise PolicyError(
            f"group size {group} does not divide the {features} {what.split(' (')[0]} of layer {name!r}; "
            f"group sizes that do: {', '.join(map(str, divisors[:10])) or 'none (odd width)'}{per_channel}"
        )
    longest = MAX_CONV_REDUCTION if precision.family == "int8-asym" else kind.max_reduction
    if precision.family in INT8_GEMM_FAMILIES and features > longest > 0:
        raise PolicyError(
            f"layer {name!r} has {features} {what}; {precision.name!r} accumulates int8 products "
            f"in int32, which is proven overflow-free only up to {longest}: use w8 or a float precision"
        )
    if kind is EMBEDDING and module.max_norm is not None and precision.family != "fp32":
        raise PolicyError(f"embedding {name!r} uses max_norm, which a frozen low-precision table cannot honour")


def group_size_for(module: nn.Module, precision: Precision) -> int | None:
    """Effective group size: Linear ``w4``/``w4a8`` -> 32, Embedding ``w4`` -> whole row, Conv
    ``w4`` -> an output channel's whole window; ``w8gN`` -> N, per-channel ``w8`` -> None."""
    if precision.family == "w8":
        return precision.group_size
    if precision.family not in GROUPED_FAMILIES:
        return None
    return precision.group_size or _kind(module).default_group(module)


def built_name(module: nn.Module, precision: Precision) -> str:
    """The precision name the built layer carries: a Linear's ``w4`` / ``w4a8`` is ``w4g32`` /
    ``w4a8g32``; every other name is kept as written."""
    if not is_linear(module) or precision.group_size or precision.family not in GROUPED_FAMILIES:
        return precision.name
    return f"{precision.family}g{group_size_for(module, precision)}"


def has_integer_weights(module: nn.Module, precision: Precision) -> bool:
    """Whether ``precision`` stores this layer's weight as integer codes that GPTQ can round."""
    return precision.family in _kind(module).gptq_families


def rounds_to_integers(precision: Precision) -> bool:
    """Whether ``precision`` rounds a layer's weight to integer codes (to nearest, or by GPTQ)."""
    return precision.family in ("int8", "int8-static", "int8-asym", "int8-tensor", "w8", *GROUPED_FAMILIES)


def build(module: nn.Module, precision: Precision, input_qparams: QParams | None = None,
          hessian: Tensor | None = None) -> nn.Module:
    """Quantize a float layer into the module for ``precision``.

    ``hessian`` (Linear layers with integer weights only) selects GPTQ weight rounding.
    """
    if precision.family == "fp32":
        return module
    from_float, _ = _kind(module).builders[precision.key]
    return from_float(as_linear(module), precision, input_qparams, hessian)


def build_empty(module: nn.Module, precision: Precision) -> nn.Module:
    """The quantized module for ``precision`` with placeholder storage of the right shapes."""
    if precision.family == "fp32":
        return module
    _, empty = _kind(module).builders[precision.key]
    return empty(as_linear(module), precision)
