"""The single-process n-worker simulator's primitives: per-worker gradients as rows of one matrix.

Distributed methods in optimlab are written twice over the same functional core: once on real
``torch.distributed`` ranks, once here, where one process holds all n workers' gradients as the rows of an
``(n, d)`` matrix and applies exactly the same per-worker maths (error buffers, compression, server state) to
each row. Tests run both on the same data and compare parameters; the bench uses the simulator.

A method's simulation takes the ``(n, d)`` matrix from :func:`worker_gradients`, turns it into one
``d``-vector (the direction every replica would apply), and :func:`assign_gradient` writes that vector into
``p.grad`` so any ``torch.optim`` optimizer takes the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["worker_gradients", "flat_gradient", "assign_gradient", "flat_params"]


def _trainable(model: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    params = model.parameters() if isinstance(model, nn.Module) else model
    return [p for p in params if p.requires_grad]


def flat_params(model: nn.Module | Iterable[Tensor]) -> Tensor:
    """The trainable parameters concatenated into one vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in _trainable(model)])


def flat_gradient(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The gradient of ``loss`` with respect to ``params``, flattened into one vector in their order (zeros for a
    parameter the loss does not use); frees the loss's graph and leaves ``p.grad`` as it was."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def worker_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    worker_batches: Sequence[Any],
) -> tuple[Tensor, Tensor]:
    """Each worker's gradient of ``loss_fn(model, batch)`` at the current parameters, and the losses.

    Returns ``(grads, losses)``: ``grads`` is ``(n, d)``, row i the flattened gradient over the trainable
    parameters (in ``model.parameters()`` order) on ``worker_batches[i]``; ``losses`` is ``(n,)``. ``p.grad``
    is left as it was.
    """
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    rows, losses = [], []
    for batch in worker_batches:
        loss = loss_fn(model, batch)
        rows.append(flat_gradient(loss, params))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


def assign_gradient(model: nn.Module | Iterable[Tensor], flat: Tensor) -> None:
    """Write the vector ``flat`` into ``p.grad`` of the trainable parameters (the inverse of the flattening
    :func:`worker_gradients` does)."""
    params = _trainable(model)
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat gradient has {flat.numel()} elements, the parameters {total}")
    offset = 0
    for p in params:
        g = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += p.numel()
