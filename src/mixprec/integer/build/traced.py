"""A float PyTorch CNN of any wiring (residual blocks included) plus calibration data -> an int8
or 16x8 integer :class:`Graph` (NHWC), by tracing it with ``torch.fx``.

:func:`cnn_graph_traced` converts the traced operations in order, each as
:func:`~mixprec.integer.build.cnn.cnn_graph_from` converts the layer of a chain (the same
weights, biases, calibrated grids and padding rules):

- ``nn.Conv2d`` (BatchNorms folded first: :func:`mixprec.fold_batchnorm`) -> CONV_2D or
  DEPTHWISE_CONV_2D (after a PAD where SAME does not reproduce the padding);
- ``a + b`` / ``torch.add(a, b)`` of two same-shaped tensors -> ADD on its own calibrated grid;
- ``nn.ReLU``, ``nn.ReLU6``, ``F.relu``, ``F.relu6``, ``torch.relu``, ``x.relu()`` -> the fused
  activation of the operation whose output it reads (convolution, ADD, pooling, Linear), which
  nothing else may read (TFLite has no separate int8 ReLU here);
- ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with padding 0 (VALID);
- ``x.mean((2, 3))`` / ``torch.mean(x, (2, 3))`` (or ``(-2, -1)``, no ``keepdim``), and
  ``nn.AdaptiveAvgPool2d(1)`` -> the global mean (MEAN in int8; in int16 an AVERAGE_POOL_2D over
  the map and a RESHAPE);
- ``nn.Flatten`` / ``torch.flatten(x, 1)`` / ``x.flatten(1)`` of a 1x1 map -> nothing (or a
  RESHAPE); a larger map would flatten in NHWC order, which differs from PyTorch's, and is refused;
- ``nn.Linear`` on a flat ``[N, features]`` tensor -> FULLY_CONNECTED;
- ``nn.Identity`` (a folded BatchNorm) and ``nn.Dropout`` -> nothing.

Every activation tensor is calibrated on its float values over the calibration batch (after a
fused ReLU), asymmetric int8 or symmetric int16 as ``activations`` says. Anything else
(another operator, a constant operand, several inputs, a model ``torch.fx`` cannot trace) is
refused by name.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixprec.errors import InputError
from mixprec.integer.build.cnn import conv_nodes, global_mean_nodes, pool_nodes
from mixprec.integer.build.layers import calibrate_as, fully_connected_from
from mixprec.integer.core.tensors import Quantization, TensorSpec
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.nodes import AddNode, ReshapeNode

_RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ALIAS_MODULES = (nn.Identity, nn.Dropout)
_GLOBAL_AXES = ({2, 3}, {-2, -1}, {2, -1}, {-2, 3})


@dataclass
class _Tensor:
    """A graph tensor: its number, its float value on the calibration batch (PyTorch's layout:
    NCHW, or ``[N, features]``), and its grid."""

    index: int
    value: torch.Tensor
    quant: Quantization
    flat: bool = False  # the integer tensor is [N, features] (a global mean's), whatever the value's shape


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, Callable] | None:
    """``(name, function)`` when ``node`` is a ReLU or ReLU6 of one tensor, else None."""
    if node.op == "call_module" and type(modules[node.target]) in _RELU_MODULES:
        return _RELU_MODULES[type(modules[node.target])], modules[node.target]
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) == 1:
        return _RELU_FUNCTIONS[node.target], node.target
    if node.op == "call_method" and node.target in ("relu", "relu6") and len(node.args) == 1:
        return node.target, torch.relu if node.target == "relu" else F.relu6
    return None


def _is_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], _ALIAS_MODULES)


def _global_mean_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The input of ``node`` when it is a mean over height and width (or AdaptiveAvgPool2d(1)), else None."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.AdaptiveAvgPool2d):
        size = modules[node.target].output_size
        if size not in (1, (1, 1)):
            raise InputError(f"{node.target}: AdaptiveAvgPool2d must pool to 1x1 (a global mean), got {size}")
        return node.args[0]
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)
    if not is_mean:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.kwargs.get("keepdim", False) or not isinstance(dims, (tuple, list)) or set(dims) not in _GLOBAL_AXES:
        raise InputError(f"{node.name}: only a mean over height and width (dims (2, 3), keepdim False) converts, "
                         f"got dims {dims!r}, keepdim {node.kwargs.get('keepdim', False)}")
    return node.args[0]


def _flatten_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The input of ``node`` when it flattens all but the batch, else None."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.Flatten):
        flatten = modules[node.target]
        if (flatten.start_dim, flatten.end_dim) != (1, -1):
            raise InputError(f"{node.target}: only nn.Flatten(1, -1) converts")
        return node.args[0]
    if (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if (start, end) != (1, -1):
            raise InputError(f"{node.name}: only flatten(x, 1) (all but the batch) converts, got start {start}, "
                             f"end {end}")
        return node.args[0]
    return None


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module]]:
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model's
        raise InputError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                         "cnn_graph_traced needs a model without data-dependent control flow") from None
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if _is_alias(node, modules):
            node.replace_all_uses_with(node.args[0])
            traced.graph.erase_node(node)
    return traced.graph, modules


class _Builder:
    """Walks a traced graph in order, appending integer nodes; see :func:`cnn_graph_traced`."""

    def __init__(self, modules: dict[str, nn.Module], kind: str, margin: float) -> None:
        self.modules, self.kind, self.margin = modules, kind, margin
        self.nodes: list = []
        self.tensors: dict[fx.Node, _Tensor] = {}
        self.fused: dict[fx.Node, fx.Node] = {}  # ReLU node -> the node whose operator applies it
        self.spec: TensorSpec | None = None

    def operand(self, node: fx.Node, arg: object) -> _Tensor:
        if not isinstance(arg, fx.Node) or arg not in self.tensors:
            raise InputError(f"{node.name}: reads {arg!r}, which is not a tensor of the traced graph (constants and "
                             "parameters as operands do not convert)")
        return self.tensors[arg]

    def fusion(self, node: fx.Node) -> tuple[str, Callable | None]:
        """The ReLU that the operator of ``node`` applies: its only reader, when that is a ReLU."""
        if len(node.users) == 1:
            reader = next(iter(node.users))
            activation = _activation_of(reader, self.modules)
            if activation is not None:
                self.fused[reader] = node
                return activation
        return "none", None

    def emit(self, node: fx.Node, value: torch.Tensor, added: list, quant: Quantization | None = None,
             flat: bool = False) -> None:
        """Append ``added`` (each reading the tensor before it, the first an existing one); the last
        one's output (on its ``output_quant``, else on ``quant``) is the tensor of ``node``."""
        self.nodes += added
        grid = getattr(added[-1], "output_quant", quant)
        self.tensors[node] = _Tensor(len(self.nodes), value, grid, flat or value.dim() == 2)

    def input(self, node: fx.Node, calibration: torch.Tensor) -> None:
        if self.spec is not None:
            raise InputError("cnn_graph_traced converts models of one input tensor")
        quant = calibrate_as(self.kind, calibration, self.margin)
        shape = (1, calibration.shape[2], calibration.shape[3], calibration.shape[1])
        self.spec = TensorSpec(node.name, shape, quant, self.kind)
        self.tensors[node] = _Tensor(0, calibration, quant)

    def convert(self, node: fx.Node) -> None:
        """Append the integer nodes of one traced operation (see module docstring)."""
        if node in self.fused:
            self.tensors[node] = self.tensors[self.fused[node]]
            return
        if _activation_of(node, self.modules) is not None:
            raise InputError(f"{node.name}: a ReLU converts only as the fused activation of the convolution, ADD, "
                             "pooling or Linear whose output nothing else reads")
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise InputError(f"{node.target}: fold the BatchNorms first (mixprec.fold_batchnorm); TFLite has no "
                             "int8 BatchNorm")
        mean_of, flat_of = _global_mean_input(node, self.modules), _flatten_input(node, self.modules)
        if isinstance(module, nn.Conv2d):
            self.conv(node, module)
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            source = self.operand(node, node.args[0])
            activation, follower = self.fusion(node)
            value, added = pool_nodes(module, source.value, source.index, activation, follower)
            self.emit(node, value, added, source.quant)
        elif isinstance(module, nn.Linear):
            self.linear(node, module)
        elif mean_of is not None:
            source = self.operand(node, mean_of)
            if source.value.dim() != 4:
                raise InputError(f"{node.name}: the global mean takes an NCHW map, got shape "
                                 f"{tuple(source.value.shape)}")
            value, added = global_mean_nodes(source.value, source.index, self.kind, self.margin)
            if node.op == "call_module":  # AdaptiveAvgPool2d keeps the 1x1 map; the integer tensor is flat
                value = value[:, :, None, None]
            self.emit(node, value, added, source.quant, flat=True)
        elif flat_of is not None:
            self.flatten(node, self.operand(node, flat_of))
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            self.add(node)
        else:
            what = node.target if node.op != "call_module" else type(module).__name__
            raise InputError(f"cnn_graph_traced does not convert {what} ({node.name}); it takes Conv2d, ADD, "
                             "ReLU/ReLU6 fused, MaxPool2d, AvgPool2d, a global mean, flatten, Linear, Identity")

    def conv(self, node: fx.Node, conv: nn.Conv2d) -> None:
        source = self.operand(node, node.args[0])
        if source.value.dim() != 4:
            raise InputError(f"{node.target}: Conv2d needs an NCHW input, got shape {tuple(source.value.shape)}")
        activation, follower = self.fusion(node)
        value, added = conv_nodes(conv, source.value, source.quant, source.index, activation, follower,
                                  self.margin, self.kind)
        self.emit(node, value, added)

    def linear(self, node: fx.Node, linear: nn.Linear) -> None:
        source = self.operand(node, node.args[0])
        if source.value.dim() != 2:
            raise InputError(f"{node.target}: nn.Linear needs a flat [N, features] input here, got shape "
                             f"{tuple(source.value.shape)}")
        activation, follower = self.fusion(node)
        value = linear(source.value)
        value = follower(value) if follower is not None else value
        added = [fully_connected_from(linear, source.index, source.quant, calibrate_as(self.kind, value, self.margin),
                                      activation, activations=self.kind)]
        self.emit(node, value, added)

    def flatten(self, node: fx.Node, source: _Tensor) -> None:
        value = source.value.flatten(1)
        if source.flat:
            self.tensors[node] = _Tensor(source.index, value, source.quant, True)
        elif source.value.dim() == 4 and tuple(source.value.shape[2:]) == (1, 1):
            self.emit(node, value, [ReshapeNode((source.index,), (value.shape[1],))], source.quant)
        else:
            raise InputError(f"{node.name}: flattening a {tuple(source.value.shape[1:])} map would order features "
                             "as NHWC, not as PyTorch's NCHW; pool to 1x1 first")

    def add(self, node: fx.Node) -> None:
        if len(node.args) != 2 or node.kwargs:
            raise InputError(f"{node.name}: only a + b of two tensors converts (no alpha, no out)")
        a, b = (self.operand(node, arg) for arg in node.args)
        if a.value.shape != b.value.shape:
            raise InputError(f"{node.name}: ADD of shapes {tuple(a.value.shape)} and {tuple(b.value.shape)}; only "
                             "equal shapes convert (broadcasting differs between NCHW and NHWC)")
        activation, follower = self.fusion(node)
        value = a.value + b.value
        value = follower(value) if follower is not None else value
        self.emit(node, value, [AddNode((a.index, b.index), calibrate_as(self.kind, value, self.margin), activation)])


def cnn_graph_traced(model: nn.Module, calibration: torch.Tensor, margin: float = 0.0,
                     activations: str = "int8") -> Graph:
    """The integer graph of a float CNN traced with ``torch.fx`` (see module docstring).

    ``calibration``: float NCHW inputs (a batch); the graph's input is their NHWC image on the
    input's grid and takes NHWC arrays of any batch size. ``activations``: ``"int8"`` or
    ``"int16"`` (TFLite's 16x8 mode) for every tensor. The model runs in eval mode while it is
    traced and calibrated, then returns to its mode.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"cnn_graph_traced takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 4 or not calibration.is_floating_point():
        raise InputError("calibration must be a float NCHW tensor (a batch of the model's inputs)")
    if activations not in ("int8", "int16"):
        raise InputError(f"activations must be 'int8' or 'int16' (16x8), got {activations!r}")
    graph, modules = _trace(model)
    builder = _Builder(modules, activations, margin)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for node in graph.nodes:
                if node.op == "placeholder":
                    builder.input(node, calibration.detach().to(torch.float32))
                elif node.op == "output":
                    result = builder.operand(node, node.args[0])
                    if result.index != len(builder.nodes) or result.index == 0:
                        raise InputError("the model's output must be its last converted operation's tensor")
                elif node.op == "get_attr":
                    raise InputError(f"{node.target}: tensors held by the model as operands do not convert")
                else:
                    builder.convert(node)
    finally:
        model.train(was_training)
    return Graph((builder.spec,), tuple(builder.nodes))
