"""Common ground of mixprec's quantized modules."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from mixprec.errors import InputError
from mixprec.formats import QParams, QuantSpec, fp16_scale, integer_dtype, pack_int4, qparams_from_tensor, quantize
from mixprec.gptq import gptq_quantize
from mixprec.kernels.huge_pages import zeros_in_huge_pages


class QuantizedModule(nn.Module):
    """A module that owns low-precision storage (as buffers) and runs a named kernel.

    Subclasses set :attr:`precision` (the policy name, e.g. ``"w4g32"``) and
    :attr:`kernel` (what the forward pass actually executes), and override
    :attr:`slow_path` where a missing CPU feature or build sends them down a slower path.
    """

    precision: str
    kernel: str

    #: dtype of what lookups return (embeddings); Linears return their input's dtype.
    output_dtype: torch.dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.training = False  # built for inference; model.train() later is refused at forward time

    def train(self, mode: bool = True) -> QuantizedModule:
        """Sets training mode as ``nn.Module.train`` does; while in it, a forward that records
        gradients is refused (:func:`_refuse_training`). The refusing hook exists only in training
        mode: any forward hook sends every call down PyTorch's slower hook-dispatching path (about
        2 us a call measured here, against 16 us for a whole 256 x 256 w4a8 layer at one row)."""
        super().train(mode)
        hooks = self._forward_pre_hooks
        present = [key for key, hook in hooks.items() if hook is _refuse_training]
        if mode and not present:
            self.register_forward_pre_hook(_refuse_training)
        elif not mode:
            for key in present:
                del hooks[key]
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """Dtype casts (``.half()``, ``.to(torch.bfloat16)``, ``.float()``) leave the stored codes,
        scales and half weights as the policy made them and set only :attr:`output_dtype`; a
        move to another device is refused (the kernels are CPU-only)."""
        probe = torch.zeros(())
        try:
            moved = fn(probe)
        except (RuntimeError, AssertionError) as exc:
            raise InputError(f"{type(self).__name__} ({self.precision}) runs on the CPU only: {exc}") from None
        if isinstance(moved, Tensor) and moved.device != probe.device:
            raise InputError(f"{type(self).__name__} ({self.precision}) runs on the CPU only; its storage cannot "
                             f"move to {moved.device} (keep the model on the CPU)")
        if isinstance(moved, Tensor) and moved.dtype.is_floating_point:
            self.output_dtype = moved.dtype
        return self

    @property
    def slow_path(self) -> str | None:
        """Why this module runs slower than its precision can here, or None when it does not."""
        return None

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the stored values represent, in ``nn.Linear`` / ``nn.Embedding``
        layout (``[out, in]`` / ``[rows, dim]``): what the layer multiplies by, before any
        activation quantization. Sensitivity measures use it as the weight perturbation."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its weight")

    def storage_bytes(self) -> int:
        """Exact bytes of every tensor this module holds."""
        return sum(t.nbytes for t in self.state_dict().values())


def held_state_tensors(module: nn.Module, computed: Iterable[str]) -> list[Tensor]:
    """The parameters and persistent buffers ``module`` itself holds, but those named in ``computed`` (a layout its
    state dict replaces by tensors computed on saving)."""
    skip = set(computed) | module._non_persistent_buffers_set
    return [tensor for table in (module._parameters, module._buffers) for name, tensor in table.items()
            if tensor is not None and name not in skip]


class PackedWeightMixin:
    """For int8 modules that may hold their weight only in a backend's opaque prepacked tensor
    (the ``weight`` buffer then absent): ``state_dict()`` carries the dense int8 codes as
    ``weight``, loading packs them again, deep copies and pickles carry the dense codes.

    The module provides a ``dense_weight_shape`` property, ``weight_codes()`` (dense codes) and
    ``_store_codes(codes)`` (packs them), and keeps the packed tensor in ``_packed``.
    """

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "weight" not in self._buffers:
            destination[prefix + "weight"] = self.weight_codes()

    def held_state(self) -> tuple[list[Tensor], int] | None:
        """For byte accounting without unpacking: the state-dict tensors held as saved, and the bytes of the dense
        codes computed on saving (None: the dense codes are held, the state dict is what the module holds)."""
        if "weight" in self._buffers:
            return None
        return held_state_tensors(self, ()), math.prod(self.dense_weight_shape)  # int8: a byte per code

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if "weight" in self._buffers:
            return
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        dense = state_dict.get(key)
        if dense is None:
            missing_keys.append(key)
        elif dense.dtype != torch.int8 or tuple(dense.shape) != tuple(self.dense_weight_shape):
            error_msgs.append(f"{key}: expected int8 {tuple(self.dense_weight_shape)}, got {dense.dtype} "
                              f"{tuple(dense.shape)}")
        else:
            self._store_codes(dense)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if "_packed" in state:
            state["_packed"] = self.weight_codes()
        return state

    def __setstate__(self, state: dict) -> None:
        dense = state.pop("_packed", None)
        super().__setstate__(state)
        if dense is not None:
            self._store_codes(dense)


def _refuse_training(module: QuantizedModule, _args: tuple) -> None:
    if module.training and torch.is_grad_enabled():
        raise InputError(
            f"{type(module).__name__} ({module.precision}) is inference-only: its forward computes no gradients. "
            "Call model.eval() (or run under torch.no_grad()); to fine-tune through a policy, call "
            "mixprec.prepare_qat(model, policy) on the float model, train, then mixprec.quantize(model, policy)"
        )


def warn_slow_paths(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Warn (RuntimeWarning) about quantized modules that run a slow path: one warning per
    precision and reason, naming the layers (the first five, then a count) and why."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, module in modules:
        reason = module.slow_path if isinstance(module, QuantizedModule) else None
        if reason:
            groups.setdefault((module.precision, reason), []).append(name)
    for (precision, reason), names in groups.items():
        shown = ", ".join(repr(name) for name in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if len(names) == 1:
            which = f"layer {shown} ({precision}) runs"
        else:
            which = f"{len(names)} {precision} layers ({shown}) run"
        warnings.warn(f"mixprec: {which} a slow path: {reason}", RuntimeWarning, stacklevel=3)


def check_linear_input(x: Tensor, in_features: int, name: str) -> None:
    """Refuse inputs a linear layer cannot take, with a message saying what would fit."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name} takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InputError(
            f"{name} takes float32, float16, bfloat16 or float64 input (computed in its own precision, returned "
            f"in the input's dtype), got {x.dtype}; convert with x.float()"
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise InputError(
            f"{name} expects input of shape [..., {in_features}], got {tuple(x.shape)}"
        )
    if x.device.type != "cpu":
        raise InputError(f"{name} runs on the CPU; move the input there (x.cpu()), got {x.device}")


def as_float32_matrix(x: Tensor) -> Tensor:
    """``x [..., K]`` as a contiguous float32 ``[M, K]`` (no copy when it already is one)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype is not torch.float32:
        x = x.to(torch.float32)
    return x if x.is_contiguous() else x.contiguous()


def restore_shape(y: Tensor, x: Tensor) -> Tensor:
    """``y [M, N]`` back to ``x``'s leading dimensions and dtype."""
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def check_token_ids(ids: Tensor, num_embeddings: int, name: str) -> None:
    """Refuse token ids that are not integers in ``[0, num_embeddings)``."""
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise InputError(f"{name} takes int64 or int32 token ids, got {got}")
    if ids.device.type != "cpu":
        raise InputError(f"{name} runs on the CPU; move the token ids there (ids.cpu()), got {ids.device}")
    if torch.compiler.is_compiling():  # no host sync in a compiled graph: a runtime assert instead
        torch._assert_async(((ids >= 0) & (ids < num_embeddings)).all(),
                            f"{name} has {num_embeddings} rows; token ids must lie in [0, {num_embeddings - 1}]")
        return
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise InputError(
            f"{name} has {num_embeddings} rows; token ids must lie in [0, {num_embeddings - 1}], "
            f"got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def round_weight(weight: Tensor, spec: QuantSpec, hessian: Tensor | None = None,
                 scale_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, QParams]:
    """Integer codes and parameters of a ``[out, in]`` weight under ``spec``.

    Without ``hessian``: round to nearest (min/max scales, then ``scale_fn`` if given).
    With ``hessian`` (``[in, in]``, from calibration): GPTQ error-compensating rounding.
    """
    weight = weight.detach().to(torch.float32)
    if hessian is not None:
        return gptq_quantize(weight, hessian, spec, scale_fn=scale_fn)
    qp = weight_qparams(weight, spec, scale_fn)
    return quantize_rows_in_chunks(weight, qp), qp


def round_weight_int4_packed(weight: Tensor, spec: QuantSpec,
                             scale_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, QParams]:
    """:func:`round_weight` (round to nearest) of a ``[out, in]`` weight under a 4-bit ``spec``,
    packed two codes per byte in ``weight.reshape(-1)`` order (:func:`~mixprec.formats.pack_int4`'s
    nibbles; one zero nibble pads an odd count): a flat uint8 tensor of ``(numel + 1) // 2`` bytes.
    Rows are rounded and packed a block at a time, so neither the int8 codes nor packing's
    temporaries ever exist for the whole weight (the same bytes as packing ``round_weight``'s codes)."""
    weight = weight.detach().to(torch.float32)
    if spec.bits != 4:
        raise ValueError(f"round_weight_int4_packed needs a 4-bit spec, got {spec.bits} bits")
    qp = weight_qparams(weight, spec, scale_fn)
    cols = weight.shape[1]
    packed = torch.empty((weight.numel() + 1) // 2, dtype=torch.uint8)
    for begin, _end, codes in _quantized_row_blocks(weight, qp, row_multiple=1 if cols % 2 == 0 else 2):
        flat = codes.reshape(-1)
        if flat.numel() % 2:  # the last block of an odd count
            flat = torch.cat((flat, flat.new_zeros(1)))
        packed[begin * cols // 2: begin * cols // 2 + flat.numel() // 2] = pack_int4(flat)
    return packed, qp


def weight_qparams(weight: Tensor, spec: QuantSpec, scale_fn: Callable[[Tensor], Tensor] | None = None) -> QParams:
    """Min/max parameters of a float32 weight under ``spec``, the scales then passed through ``scale_fn``."""
    qp = qparams_from_tensor(weight, spec)
    return qp if scale_fn is None else QParams(spec, scale_fn(qp.scale), qp.zero_point)


#: Most weight elements quantized at once by :func:`quantize_rows_in_chunks` (1 MiB of float32).
QUANTIZE_CHUNK_ELEMENTS = 1 << 18


def quantize_rows_in_chunks(weight: Tensor, qp: QParams) -> Tensor:
    """``quantize(weight, qp)`` for a ``[out, in]`` weight, a block of rows at a time, so
    the float temporaries stay at most :data:`QUANTIZE_CHUNK_ELEMENTS` elements (same codes:
    per-tensor, per-output-channel and per-group parameters never span rows)."""
    codes = torch.empty(weight.shape, dtype=integer_dtype(qp.spec))
    for begin, end, block in _quantized_row_blocks(weight, qp):
        codes[begin:end] = block
    return codes


def _quantized_row_blocks(weight: Tensor, qp: QParams, row_multiple: int = 1) -> Iterator[tuple[int, int, Tensor]]:
    """``(begin, end, quantize(weight[begin:end]))`` over blocks of about :data:`QUANTIZE_CHUNK_ELEMENTS`
    elements, each block's row count a multiple of ``row_multiple`` (but the last); one block when the
    parameters run along another axis than the rows."""
    spec = qp.spec
    if spec.granularity == "channel" and spec.axis not in (0, -2):
        yield 0, weight.shape[0], quantize(weight, qp)
        return
    rows_per_chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    rows_per_chunk = -(-rows_per_chunk // row_multiple) * row_multiple
    for begin in range(0, weight.shape[0], rows_per_chunk):
        end = min(begin + rows_per_chunk, weight.shape[0])
        rows_qp = qp if spec.granularity == "tensor" else QParams(spec, qp.scale[begin:end], qp.zero_point[begin:end])
        yield begin, end, quantize(weight[begin:end], rows_qp)


def w4_group_spec(group_size: int) -> QuantSpec:
    """``w4gN`` weights: symmetric int4 codes in [-7, 7], one scale per ``group_size``
    consecutive elements of a row (the scale then rounded to fp16)."""
    return QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=group_size)


def w8_group_spec(group_size: int) -> QuantSpec:
    """``w8gN`` weights: symmetric int8 codes in [-127, 127], one scale per ``group_size``
    consecutive elements of a row (the scale then rounded to fp16)."""
    return QuantSpec(bits=8, signed=True, symmetric=True, granularity="group", group_size=group_size)


class W8GroupStorage(QuantizedModule):
    """``w8gN`` storage shared by the Linear and the Embedding: int8 codes ``weight [rows,
    columns]`` and fp16 scales ``weight_scale [rows, columns / N]``, set by one rounding rule
    (so a weight tied between a head and a table gets the same codes in both)."""

    def __init__(self, rows: int, columns: int, group_size: int) -> None:
        super().__init__()
        if columns % group_size:
            raise ValueError(f"group size {group_size} does not divide the {columns} weights of a row")
        self.group_size = group_size
        self.precision = f"w8g{group_size}"
        self.register_buffer("weight", zeros_in_huge_pages((rows, columns), torch.int8))
        self.register_buffer("weight_scale", torch.ones(rows, columns // group_size, dtype=torch.float16))

    def _set_codes(self, weight: Tensor, hessian: Tensor | None = None) -> None:
        """Round ``weight`` (GPTQ with ``hessian``, else to nearest) onto fp16-scaled groups."""
        codes, qp = round_weight(weight, w8_group_spec(self.group_size), hessian, scale_fn=fp16_scale)
        self.weight.copy_(codes)
        self.weight_scale.copy_(qp.scale)
