"""BatchNorm folding: a ``Conv -> BatchNorm`` pair becomes one convolution.

In inference a BatchNorm is the affine map ``y = (x - mean) * gamma / sqrt(var + eps) + beta``
per channel, so a convolution whose output only it reads can absorb it:

    s[o]     = gamma[o] / sqrt(var[o] + eps)          (gamma = 1 without affine parameters)
    W'[o]    = W[o] * s[o]
    b'[o]    = (b[o] - mean[o]) * s[o] + beta[o]     (b = 0 without a conv bias, beta = 0 without affine)

computed in float64 and rounded once to float32 (the weight a block of output channels at a
time, so folding holds about one float32 copy of the layer, not float64 ones). The pair is found in the model's traced
graph (``torch.fx``): the BatchNorm's only input is the convolution's output, which nothing
else reads, each module is called once and held under one name, the channel counts agree
and the BatchNorm tracks running statistics. A model ``torch.fx`` cannot trace falls back
to neighbours inside an ``nn.Sequential`` (whose children see nothing but the previous
child's output). A BatchNorm that follows a convolution but fails a condition is not folded,
and :func:`find_folds` says why.
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.errors import PolicyError
from mixprec.nn.conv_layout import is_conv

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: Weights folded per float64 block (2**17 elements: 1 MiB of float64).
_FOLD_BLOCK_ELEMENTS = 2**17


@dataclass(frozen=True)
class Fold:
    """The BatchNorm ``batchnorm`` folds into the convolution ``conv`` (module names)."""

    conv: str
    batchnorm: str


@dataclass(frozen=True)
class ReluFusion:
    """The ``nn.ReLU`` module ``relu`` reads only the output of ``conv`` (directly, or through a
    BatchNorm that folds into it), so an int8 convolution can apply it in its epilogue."""

    conv: str
    relu: str


@dataclass(frozen=True)
class FoldSearch:
    """What :func:`find_folds` found: the pairs that fold, the pairs that do not (with why), and
    the ReLU modules that could run in their convolution's epilogue."""

    folds: tuple[Fold, ...]
    refused: dict[Fold, str]
    relus: tuple[ReluFusion, ...] = ()


@dataclass(frozen=True)
class _Edge:
    """Module ``target`` takes module ``source``'s output as its input; ``only_reader``: nothing
    else reads that output."""

    source: str
    target: str
    only_reader: bool


def _is_batchnorm(module: nn.Module) -> bool:
    return type(module) in _BATCHNORMS


def find_folds(model: nn.Module) -> FoldSearch:
    """Every ``Conv -> BatchNorm`` pair of ``model`` that can fold (see module docstring), and
    every ``Conv [-> BatchNorm that folds] -> nn.ReLU`` chain whose ReLU only reads the convolution."""
    modules = dict(model.named_modules())
    if not any(is_conv(module) for module in modules.values()):
        return FoldSearch((), {})  # nothing to fold into: no tracing (a transformer may take seconds)
    held = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    try:
        edges, calls = _traced_edges(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the Sequential structure
        edges, calls = _sequential_edges(model), None
    folds, refused = [], {}
    for edge in edges:
        conv, bn = modules[edge.source], modules[edge.target]
        if not (is_conv(conv) and _is_batchnorm(bn)):
            continue
        reason = _refusal(conv, bn, edge.source, edge.only_reader, held, calls)
        if reason:
            refused[Fold(edge.source, edge.target)] = reason
        else:
            folds.append(Fold(edge.source, edge.target))
    folded_into = {fold.batchnorm: fold.conv for fold in folds}
    relus = []
    for edge in edges:
        relu = modules[edge.target]
        if type(relu) is not nn.ReLU or not edge.only_reader or held[id(relu)] > 1 or (calls and calls[id(relu)] > 1):
            continue
        source = modules[edge.source]
        if is_conv(source) and held[id(source)] == 1 and not (calls and calls[id(source)] > 1):
            relus.append(ReluFusion(edge.source, edge.target))
        elif edge.source in folded_into:
            relus.append(ReluFusion(folded_into[edge.source], edge.target))
    return FoldSearch(tuple(folds), refused, tuple(relus))


def _refusal(conv: nn.Module, bn: nn.Module, conv_name: str, only_reader: bool, held: Counter,
             calls: Counter | None) -> str | None:
    if not only_reader:
        return f"the output of {conv_name!r} is read elsewhere too, so folding would change that reader's input"
    if held[id(conv)] > 1 or held[id(bn)] > 1:
        return "the convolution or the BatchNorm is held under more than one name (shared module)"
    if calls is not None and (calls[id(conv)] > 1 or calls[id(bn)] > 1):
        return "the convolution or the BatchNorm is called more than once"
    if bn.num_features != conv.out_channels:
        return f"it has {bn.num_features} channels and {conv_name!r} outputs {conv.out_channels}"
    if bn.running_mean is None or bn.running_var is None:
        return "it tracks no running statistics (track_running_stats=False): it normalizes by each batch"
    return None


def _traced_edges(model: nn.Module) -> tuple[list[_Edge], Counter]:
    edges, calls = _edges_of(torch.fx.symbolic_trace(model).graph, dict(model.named_modules()))
    # The traced module shares the model's layers inside reference cycles: collect it now, or every
    # float layer it saw outlives its replacement while quantize() runs (measured: 3x a layer's size).
    gc.collect()
    return edges, calls


def _edges_of(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> tuple[list[_Edge], Counter]:
    calls: Counter = Counter()
    edges = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        calls[id(modules[str(node.target)])] += 1
        source = node.args[0] if node.args else None
        only_reader = isinstance(source, torch.fx.Node) and len(source.users) == 1
        while _is_identity_call(source, modules):  # a BatchNorm folded earlier, for instance
            source = source.args[0]
            only_reader = only_reader and len(source.users) == 1
        if isinstance(source, torch.fx.Node) and source.op == "call_module":
            edges.append(_Edge(str(source.target), str(node.target), only_reader))
    return edges, calls


def _is_identity_call(node: object, modules: dict[str, nn.Module]) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_module"
            and type(modules[str(node.target)]) is nn.Identity and bool(node.args))


def _sequential_edges(model: nn.Module) -> list[_Edge]:
    edges = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        children = [prefix + child for child, c in module.named_children() if type(c) is not nn.Identity]
        edges += [_Edge(source, target, True) for source, target in zip(children, children[1:])]
    return edges


def folded_conv(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new float32 convolution equal to ``bn(conv(x))`` in inference (formulas above), with a bias."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
        bias = (bias - bn.running_mean.double()) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        weight = torch.empty(conv.weight.shape, dtype=torch.float32)
        per_channel = conv.weight[0].numel()
        step = max(1, _FOLD_BLOCK_ELEMENTS // per_channel)
        for start in range(0, conv.out_channels, step):  # float64 one block of output channels at a time
            block = slice(start, start + step)
            weight[block] = conv.weight[block].double() * scale[block].reshape(-1, *([1] * (conv.weight.dim() - 1)))
        folded = with_bias_template(conv)
        folded.weight = nn.Parameter(weight, requires_grad=False)
        folded.bias = nn.Parameter(bias.to(torch.float32), requires_grad=False)
    return folded


def with_bias_template(conv: nn.Module, device: str = "meta") -> nn.Module:
    """A convolution with ``conv``'s geometry and a bias (storage on ``device``, uninitialised):
    the shape a folded convolution has."""
    return type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=device).eval()


@dataclass(frozen=True)
class Merges:
    """What quantizing merges: ``folds`` (convolution -> its BatchNorm), ``relus`` (int8
    convolution -> the ReLU run in its epilogue) and ``unfolded`` (BatchNorm after a quantized
    convolution that stays -> why)."""

    folds: dict[str, str]
    relus: dict[str, str]
    unfolded: dict[str, str]

    @property
    def folded_into(self) -> dict[str, str]:
        return {bn: conv for conv, bn in self.folds.items()}


def plan_merges(model: nn.Module, quantized: set[str], int8_convs: set[str], enabled: bool) -> Merges:
    """The folds and fusions :func:`mixprec.quantize` makes when the layers ``quantized`` are
    quantized (``int8_convs`` among them at int8 / int8-static); none when not ``enabled``."""
    search = find_folds(model) if enabled and quantized else FoldSearch((), {})
    return Merges({f.conv: f.batchnorm for f in search.folds if f.conv in quantized},
                  {f.conv: f.relu for f in search.relus if f.conv in int8_convs},
                  {f.batchnorm: why for f, why in search.refused.items() if f.conv in quantized})


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batchnorm(model: nn.Module) -> FoldSearch:
    """Fold every foldable ``Conv -> BatchNorm`` pair of a float ``model`` in place: the convolution
    takes the folded weight and bias (float32), the BatchNorm becomes ``nn.Identity``. Returns what
    was folded and what was not, with why.

    :func:`mixprec.quantize` folds the pairs whose convolution it quantizes by itself; fold first
    when measuring sensitivity or latency, so that the measurements see the convolutions that
    ``quantize`` will build.
    """
    if not isinstance(model, nn.Module):
        raise PolicyError(f"fold_batchnorm takes a torch.nn.Module, got {type(model).__name__}")
    search = find_folds(model)
    for fold in search.folds:
        conv, bn = model.get_submodule(fold.conv), model.get_submodule(fold.batchnorm)
        replace_module(model, fold.conv, folded_conv(conv, bn))
        replace_module(model, fold.batchnorm, nn.Identity())
    return search


def warn_unfolded(model: nn.Module, what: str) -> None:
    """Warn (RuntimeWarning) when ``model`` holds pairs :func:`mixprec.quantize` would fold, so that
    ``what`` (a measurement) would see unfolded convolutions that ``quantize`` never builds."""
    if not any(_is_batchnorm(module) for module in model.modules()):
        return  # only folds matter here; find_folds would still trace for ReLU fusions
    folds = find_folds(model).folds
    if folds:
        names = ", ".join(repr(fold.batchnorm) for fold in folds[:3]) + (" ..." if len(folds) > 3 else "")
        warnings.warn(f"mixprec: {what} sees {len(folds)} BatchNorms ({names}) that quantize() folds into their "
                      "convolutions; call mixprec.fold_batchnorm(model) first so it measures the folded "
                      "convolutions that quantize() builds", RuntimeWarning, stacklevel=3)
