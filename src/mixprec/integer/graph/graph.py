"""An integer graph: operators (:mod:`mixprec.integer.graph.nodes`) over numbered tensors.

Tensors ``0 .. len(inputs) - 1`` are the graph's inputs; node ``i`` produces tensor
``len(inputs) + i``; the last node's tensor is the output. Building the graph derives every
node's runtime record once; calling it touches only those records, with one fusion that keeps
every code: a PAD read only by a VALID convolution is applied by that convolution. A graph of one
input whose operators all have native kernels runs them in one native call
(:mod:`~mixprec.integer.graph.native_plan`), with the codes of the operators run one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from mixprec.errors import InputError
from mixprec.integer.core.profile import StageProfile, median_seconds
from mixprec.integer.core.tensors import Quantization, TensorSpec
from mixprec.integer.graph.native_plan import NativeProgram, native_program
from mixprec.integer.graph.nodes import Node
from mixprec.integer.ops.conv import conv2d_after_pad


@dataclass(frozen=True, eq=False)
class Graph:
    """Operators over numbered tensors (see module docstring); calling it with one array per
    input (of the type each input declares: int8, int16, float32 or int32) runs the records only. The
    batch (first) dimension of each input may differ from the declared one."""

    inputs: tuple[TensorSpec, ...]
    nodes: tuple[Node, ...]
    _records: tuple[Any, ...] = field(init=False, repr=False)
    _shapes: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    _quants: tuple[Quantization | None, ...] = field(init=False, repr=False)
    _dtypes: tuple[str, ...] = field(init=False, repr=False)
    _plan: tuple[Any, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.inputs or not self.nodes:
            raise InputError("a graph needs at least one input and one operator")
        shapes = [tuple(spec.shape) for spec in self.inputs]
        quants: list[Quantization | None] = [spec.quant for spec in self.inputs]
        dtypes = [spec.dtype for spec in self.inputs]
        records = []
        for index, node in enumerate(self.nodes):
            known = len(shapes)
            if any(not 0 <= i < known for i in node.inputs):
                raise InputError(f"operator {index} ({node.opcode}) reads tensors {node.inputs}, but only tensors "
                                 f"0..{known - 1} exist before it")
            wrong = [i for i in node.inputs if dtypes[i] not in node.input_dtypes]
            if wrong:
                raise InputError(f"operator {index} ({node.opcode}) takes {' or '.join(node.input_dtypes)} inputs, "
                                 f"but tensor {wrong[0]} is {dtypes[wrong[0]]}")
            in_shapes = [shapes[i] for i in node.inputs]
            in_quants = [quants[i] for i in node.inputs]
            try:
                shapes.append(node.output_shape(in_shapes))
            except InputError as exc:
                raise InputError(f"operator {index}: {exc}") from None
            in_dtypes = [dtypes[i] for i in node.inputs]
            try:
                records.append(node.prepare(in_quants, in_shapes, in_dtypes))
            except InputError as exc:
                raise InputError(f"operator {index} ({node.opcode}): {exc}") from None
            quants.append(node.result_grid(in_quants, in_dtypes))
            dtypes.append(node.result_dtype(in_dtypes))
        object.__setattr__(self, "_records", tuple(records))
        object.__setattr__(self, "_shapes", tuple(shapes))
        object.__setattr__(self, "_quants", tuple(quants))
        object.__setattr__(self, "_dtypes", tuple(dtypes))
        object.__setattr__(self, "_plan", self._execution_plan())

    @property
    def records(self) -> tuple[Any, ...]:
        """Each operator's runtime record, in order."""
        return self._records

    @property
    def tensor_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    @property
    def tensor_quants(self) -> tuple[Quantization | None, ...]:
        return self._quants

    @property
    def tensor_dtypes(self) -> tuple[str, ...]:
        return self._dtypes

    @property
    def output_quant(self) -> Quantization | None:
        return self._quants[-1]

    def __call__(self, *arrays: NDArray) -> NDArray:
        """Run on one array per input (dtype and shape as declared, batch dimension free): as one native
        program where there is one (:attr:`native_program`), else operator by operator (:meth:`run_each`)."""
        self._check_inputs(arrays)
        program = self.native_program
        if program is not None:
            return program(*(torch.from_numpy(np.ascontiguousarray(array)) for array in arrays)).numpy()
        return self._run_plan(arrays)

    def _check_inputs(self, arrays: tuple[NDArray, ...]) -> None:
        if len(arrays) != len(self.inputs):
            raise InputError(f"the graph takes {len(self.inputs)} input arrays, got {len(arrays)}")
        for spec, array in zip(self.inputs, arrays):
            if not isinstance(array, np.ndarray) or array.dtype != np.dtype(spec.dtype):
                raise InputError(f"input {spec.name!r} must be a numpy array of {spec.dtype}, got "
                                 f"{getattr(array, 'dtype', type(array).__name__)}")
            if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
                raise InputError(f"input {spec.name!r} has shape {array.shape}; the model's is {spec.shape} "
                                 "(any batch size)")

    @cached_property
    def native_program(self) -> NativeProgram | None:
        """Every operator in one native call (:mod:`~mixprec.integer.graph.native_plan`), made on first use;
        None where an operator has no native kernel for its input (the graph then runs :meth:`run_each`)."""
        return native_program(self)

    @cached_property
    def native_float_program(self) -> NativeProgram | None:
        """The native program from float32 NCHW images (quantized onto input 0's NHWC grid) to the output
        dequantized to float32, made on first use; None where there is no native program or a grid is not
        per-tensor int8 / int16 (see :func:`~mixprec.integer.graph.native_plan.native_program`)."""
        return native_program(self, float_nchw=True)

    def run_each(self, *arrays: NDArray) -> NDArray:
        """Run operator by operator from Python, each by its own entry point (as :meth:`profile` times them),
        on arrays of the declared types and shapes (batch free): the codes of a call."""
        self._check_inputs(arrays)
        return self._run_plan(arrays)

    def _run_plan(self, arrays: tuple[NDArray, ...]) -> NDArray:
        values: list[Any] = list(arrays)
        for step in self._plan:
            if step is None:  # a PAD its convolution applies itself
                values.append(None)
                continue
            run, record, inputs = step
            values.append(run(record, *(values[i] for i in inputs)))
        return values[-1]

    def _execution_plan(self) -> tuple[Any, ...]:
        """Per operator ``(run, record, input tensors)``, or None for a PAD whose one reader is a VALID
        convolution, which then pads its input itself (:func:`~mixprec.integer.ops.conv.conv2d_after_pad`:
        the same codes, without the padded copy)."""
        plan: list[Any] = [(node.run, record, tuple(node.inputs)) for node, record in zip(self.nodes, self._records)]
        for pad, (conv, pads) in self.pad_fusions.items():
            plan[pad] = None
            plan[conv] = (lambda record, x, pads=pads: conv2d_after_pad(x, record, pads), self._records[conv],
                          tuple(self.nodes[pad].inputs))
        return tuple(plan)

    @property
    def pad_fusions(self) -> dict[int, tuple[int, tuple[tuple[int, int], tuple[int, int]]]]:
        """The PADs a convolution applies itself: PAD operator index -> (its one reader, a VALID convolution, and
        the ``(top, bottom), (left, right)`` paddings); a PAD that is the output or has other readers stays."""
        readers: dict[int, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for tensor in node.inputs:
                readers.setdefault(tensor, []).append(index)
        fusions = {}
        for index, node in enumerate(self.nodes):
            tensor = len(self.inputs) + index
            reader = readers.get(tensor, [])
            if node.opcode != "PAD" or len(reader) != 1 or tensor == len(self.inputs) + len(self.nodes) - 1:
                continue
            conv, (paddings, _) = self.nodes[reader[0]], self._records[index]
            spatial = tuple(tuple(pair) for pair in paddings)
            if (conv.opcode not in ("CONV_2D", "DEPTHWISE_CONV_2D") or conv.padding != "VALID" or len(spatial) != 4
                    or spatial[0] != (0, 0) or spatial[3] != (0, 0)):
                continue
            fusions[index] = (reader[0], spatial[1:3])
        return fusions

    def profile(self, *arrays: NDArray, repeats: int = 5) -> list[StageProfile]:
        """Per operator: bytes of its runtime constants, output bytes per batch element, and
        the median time over ``repeats`` runs on ``arrays``, as a call runs it (a PAD that its
        convolution applies takes no time of its own)."""
        self(*arrays)  # validates the inputs
        steps = [((lambda *args: None), ()) if step is None else
                 ((lambda *args, run=step[0], record=step[1]: run(record, *args)), step[2]) for step in self._plan]
        seconds = median_seconds(steps, list(arrays), repeats)
        rows = []
        for index, (node, record) in enumerate(zip(self.nodes, self._records)):
            output = len(self.inputs) + index
            itemsize = np.dtype(self._dtypes[output]).itemsize
            rows.append(StageProfile(f"{index}:{node.opcode.lower()}", _constant_bytes(record),
                                     int(np.prod(self._shapes[output][1:])) * itemsize, seconds[index]))
        return rows


def _constant_bytes(record: Any) -> int:
    """Bytes of the numpy arrays a runtime record holds (its constants)."""
    if isinstance(record, np.ndarray):
        return record.nbytes
    if isinstance(record, tuple):
        return sum(_constant_bytes(item) for item in record)
    if is_dataclass(record):
        return sum(_constant_bytes(getattr(record, f.name)) for f in fields(record))
    return 0
