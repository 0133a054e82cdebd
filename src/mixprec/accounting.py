"""Exact byte accounting of the tensors modules hold."""

from __future__ import annotations

import torch
from torch import nn


def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors ``module`` itself (not its children) puts in its state dict: its
    parameters and persistent buffers, or what a module with a custom layout saves."""
    state: dict[str, torch.Tensor] = {}
    module._save_to_state_dict(state, "", keep_vars=True)
    return list(state.values())


def held_and_computed(module: nn.Module) -> tuple[list[torch.Tensor], int]:
    """What ``module``'s own state dict holds, counted without computing anything: the tensors it holds as saved,
    and the bytes of those it computes on saving from another layout (a module with such a layout says so through
    ``held_state()``: a blocked ``w4a8`` weight, oneDNN's packed int8 weight; converting them only to count bytes
    took 4.3 s of a 12.5 s ``quantize`` of a 1.17B Llama shape, and a copy of every weight at once)."""
    held_state = getattr(module, "held_state", None)
    state = held_state() if callable(held_state) else None
    return (own_tensors(module), 0) if state is None else state


def own_bytes(module: nn.Module) -> int:
    """Bytes of the tensors ``module`` itself puts in its state dict."""
    held, computed = held_and_computed(module)
    return sum(t.nbytes for t in held) + computed


def modules_with_tensors(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that hold tensors of their own, in ``named_modules`` order."""
    return [(name, module) for name, module in model.named_modules() if any(map(bool, held_and_computed(module)))]


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """What identifies one stored tensor across modules (tied weights share it): the
    address of its storage and its size in bytes."""
    return tensor.untyped_storage().data_ptr(), tensor.nbytes


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor (parameter or persistent buffer) the model holds.

    Tensors sharing storage (tied weights) are counted once.
    """
    return sum(size for size, _ in tensor_holders(model).values())


def tensor_holders(model: nn.Module) -> dict[tuple[int, int], tuple[int, tuple[str, ...]]]:
    """Every distinct tensor of ``model`` (by :func:`storage_key`): its bytes and the names of
    the modules that hold it as one of their own tensors, in ``named_modules`` order. A tied
    weight has two or more holders."""
    holders: dict[tuple[int, int], tuple[int, tuple[str, ...]]] = {}
    alive = []  # tensors made on the fly stay alive, so no address is reused
    for index, (name, module) in enumerate(model.named_modules()):
        tensors, computed = held_and_computed(module)
        alive.append(tensors)
        if computed:  # made on saving: no other module holds them
            holders[(-1 - index, computed)] = (computed, (name,))
        for tensor in tensors:
            key = storage_key(tensor)
            size, names = holders.get(key, (tensor.nbytes, ()))
            if name not in names:
                holders[key] = (size, (*names, name))
    return holders
