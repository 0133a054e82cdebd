"""Second-order statistics of a loss with respect to each layer's weight.

- :func:`hutchinson_traces`: ``Tr(H_l)``, the trace of the Hessian block of layer ``l``'s
  weight, by Hutchinson's estimator (HAWQ-V2): ``E_v[v^T H v]`` over Rademacher vectors
  ``v`` (entries +-1 with equal probability). One Hessian-vector product (a second
  backward pass through the gradient graph) serves every layer at once: a single ``v``
  spans all layer weights and each block's ``v_l^T (H v)_l`` is an unbiased estimate of
  ``Tr(H_ll)``. The result is the mean over ``samples`` vectors per batch and over batches,
  so it is the trace for the mean loss over the data. ``scaled_dot_product_attention``
  runs its math backend here, since the fused CPU kernels have no second derivative.
- :func:`fisher_diagonals`: the diagonal empirical Fisher ``F = mean_b (dL_b/dW)^2``, the
  square of each batch's gradient averaged over batches (with one example per batch this
  is the per-example empirical Fisher; larger batches average gradients first, which is
  cheaper and smaller).

Both take ``loss(model, batch) -> scalar Tensor`` and put the model back as it was
(``requires_grad`` flags, training mode); BatchNorm statistics and dropout are not
touched because the model runs in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mixprec.errors import CalibrationError

Loss = Callable[[nn.Module, Any], Tensor]


@contextmanager
def gradients_for(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, only ``weights`` require gradients and the model is in eval mode."""
    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    try:
        model.eval()
        for parameter in flags:
            parameter.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        yield
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(training)


def _scalar_loss(loss: Loss, model: nn.Module, batch: Any, index: int) -> Tensor:
    value = loss(model, batch)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise CalibrationError(f"loss(model, batch) must return a scalar tensor, got "
                               f"{type(value).__name__}{tuple(value.shape) if isinstance(value, Tensor) else ''}")
    if not value.requires_grad:
        raise CalibrationError("the loss does not depend on any layer weight (no gradient): compute it from the "
                               "model's output, without torch.no_grad()")
    if not torch.isfinite(value.detach()).all():
        raise CalibrationError(f"the loss is {float(value.detach())} on batch {index}; curvature needs a finite loss")
    return value.reshape(())


def hutchinson_traces(model: nn.Module, batches: Sequence[Any], loss: Loss, weights: Mapping[str, Tensor],
                      samples: int = 4, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Estimated ``Tr(H)`` of the mean loss for each named weight (see module docstring)."""
    if samples < 1:
        raise CalibrationError(f"hutchinson samples must be >= 1, got {samples}")
    names, tensors = list(weights), list(weights.values())
    totals = dict.fromkeys(names, 0.0)
    generator = torch.Generator().manual_seed(seed)
    with (gradients_for(model, weights), sdpa_kernel(SDPBackend.MATH),
          Progress(transient=True, disable=not progress) as bar):
        task = bar.add_task("Hessian traces (Hutchinson)", total=len(batches) * samples)
        for index, batch in enumerate(batches):
            value = _scalar_loss(loss, model, batch, index)
            grads = torch.autograd.grad(value, tensors, create_graph=True, allow_unused=True)
            live = [(n, t, g) for n, t, g in zip(names, tensors, grads) if g is not None]
            for sample in range(samples):
                probes = [torch.randint(0, 2, t.shape, generator=generator).to(t.dtype).mul_(2).sub_(1)
                          for _, t, _ in live]
                products = torch.autograd.grad([g for _, _, g in live], [t for _, t, _ in live], grad_outputs=probes,
                                               retain_graph=sample + 1 < samples, allow_unused=True)
                for (name, _, _), probe, product in zip(live, probes, products):
                    if product is not None:
                        totals[name] += float((probe * product).sum(dtype=torch.float64))
                bar.advance(task)
    return {name: total / (len(batches) * samples) for name, total in totals.items()}


def fisher_diagonals(model: nn.Module, batches: Sequence[Any], loss: Loss, weights: Mapping[str, Tensor],
                     progress: bool = True) -> dict[str, Tensor]:
    """Diagonal empirical Fisher (float32, each weight's own layout) of every named weight."""
    names, tensors = list(weights), list(weights.values())
    totals = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in weights.items()}
    with gradients_for(model, weights), Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("Fisher (squared gradients)", total=len(batches))
        for index, batch in enumerate(batches):
            value = _scalar_loss(loss, model, batch, index)
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    totals[name].addcmul_(grad.float(), grad.float())
            bar.advance(task)
    return {name: total.div_(len(batches)) for name, total in totals.items()}
