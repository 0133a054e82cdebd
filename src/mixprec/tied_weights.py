"""Tied weights after quantizing: a language model's head and its input embedding hold one float tensor; when both
layers store the same codes (the same precision and layout, e.g. ``w8gN``, ``fp16`` or ``bf16`` on both), they hold one
quantized tensor too, instead of two equal copies."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from mixprec.accounting import storage_key


def tied_groups(modules: Iterable[tuple[str, nn.Module]]) -> list[list[str]]:
    """Names of the modules whose ``weight`` is one stored tensor, in the order given; only groups of two or more."""
    holders: dict[tuple[int, int], list[str]] = {}
    for name, module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.numel() > 0:
            holders.setdefault(storage_key(weight), []).append(name)
    return [names for names in holders.values() if len(names) > 1]


def _same_layout(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two buffers could be one tensor: both plain (strided) tensors of one dtype and shape."""
    return (a is not None and b is not None and a.layout == b.layout == torch.strided and a.dtype == b.dtype
            and a.shape == b.shape)


def share_equal_buffers(first: nn.Module, other: nn.Module) -> list[str]:
    """Points every buffer of ``other`` that equals ``first``'s buffer of the same name (layout, dtype, shape and each
    value) at ``first``'s tensor, so one storage serves both; returns the names shared. Buffers that differ in
    anything stay ``other``'s own."""
    own = dict(first.named_buffers(recurse=False))
    shared = []
    for name, buffer in list(other.named_buffers(recurse=False)):
        mine = own.get(name)
        if mine is not buffer and _same_layout(mine, buffer) and torch.equal(mine, buffer):
            setattr(other, name, mine)
            shared.append(name)
    return shared


def share_tied_storage(model: nn.Module, groups: list[list[str]]) -> dict[str, str]:
    """For each group of :func:`tied_groups` (names in ``model`` after quantizing), each module's buffers shared with
    the first earlier holder that stores an equal weight (:func:`share_equal_buffers`); returns ``{module: holder}``
    for every module that now shares its weight."""
    sharing = {}
    for names in groups:
        for index, name in enumerate(names[1:], 1):
            other = model.get_submodule(name)
            for earlier in names[:index]:  # the first holder that stores the same codes (a float one stores none)
                if "weight" in share_equal_buffers(model.get_submodule(earlier), other):
                    sharing[name] = earlier
                    break
    return sharing


def saved_by_sharing(modules: list[nn.Module]) -> int:
    """Bytes ``modules[1:]`` (quantized holders of one tied weight, e.g. empty builds of one precision) would not hold
    again by sharing ``modules[0]``'s buffers that every other holds under the same name in the same layout, dtype and
    shape (:func:`share_equal_buffers` then shares them: holders of one precision store equal codes there, one
    rounding rule per format)."""
    others = [dict(module.named_buffers(recurse=False)) for module in modules[1:]]
    common = sum(buffer.nbytes for name, buffer in modules[0].named_buffers(recurse=False)
                 if all(_same_layout(buffer, other.get(name)) for other in others))
    return common * len(others)


def sharing_note(kernel: str, holder: str) -> str:
    """The report's kernel text for a layer whose weight is ``holder``'s tensor."""
    return f"{kernel}; weight shared with {holder!r} (tied)"
