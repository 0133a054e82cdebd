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


def share_equal_buffers(first: nn.Module, other: nn.Module) -> list[str]:
    """Points every buffer of ``other`` that equals ``first``'s buffer of the same name (layout, dtype, shape and each
    value) at ``first``'s tensor, so one storage serves both; returns the names shared. Buffers that differ in
    anything stay ``other``'s own."""
    own = dict(first.named_buffers(recurse=False))
    shared = []
    for name, buffer in list(other.named_buffers(recurse=False)):
        mine = own.get(name)
        if (mine is None or mine is buffer or mine.layout != torch.strided or buffer.layout != torch.strided
                or mine.dtype != buffer.dtype or mine.shape != buffer.shape or not torch.equal(mine, buffer)):
            continue
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


def shareable_bytes(modules: list[nn.Module]) -> int:
    """Bytes each of ``modules[1:]`` (quantized holders of one tied weight, e.g. empty builds of one precision) would
    hold in common with ``modules[0]``: the first's buffers that every other holds under the same name with the same
    layout, dtype and shape. Holders of one precision store equal codes there (one rounding rule per format), which
    :func:`share_equal_buffers` then shares."""
    first = dict(modules[0].named_buffers(recurse=False))
    common = 0
    for name, buffer in first.items():
        if buffer is None or buffer.layout != torch.strided:
            continue
        others = [dict(module.named_buffers(recurse=False)).get(name) for module in modules[1:]]
        if all(other is not None and other.layout == torch.strided and other.dtype == buffer.dtype
               and other.shape == buffer.shape for other in others):
            common += buffer.nbytes
    return common
