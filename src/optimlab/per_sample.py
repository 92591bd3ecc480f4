r"""Per-sample gradients: the gradient of the loss of each example of a batch, in one vectorized pass.

This is optimlab's one per-sample-gradient facility; adaptive batch sizes (:mod:`optimlab.optim.adadagrad`) and
differentially private training build on it. It runs ``torch.func.grad`` of the loss of a single example under
``torch.func.vmap`` over the batch, with the model's parameters and buffers passed to
``torch.func.functional_call``: the model itself is neither copied nor modified, and ``p.grad`` is not touched.

For a batch :math:`(x_i, y_i)_{i=1}^b` and trainable parameters :math:`\theta` the result is

.. math::

    G_i = \nabla_\theta\, \ell\big(f_\theta(x_i), y_i\big), \qquad i = 1, \dots, b,

where :math:`\ell` is ``loss_fn`` applied to a batch holding the one example :math:`i` (so ``reduction="mean"``
and ``reduction="sum"`` give the same :math:`G_i`). The mini-batch gradient is then
:math:`\tfrac1b\sum_i G_i` for a mean-reduced batch loss and :math:`\sum_i G_i` for a sum-reduced one. A loss
that also averages *inside* an example (over the tokens of a sequence, say) averages over that example's own
elements only: the per-sample gradients then average to the batch gradient only when every example has as
many elements.

Requirements and choices:

* the model's forward must treat the examples of a batch independently. Batch normalisation in training mode
  couples them (and writes its running statistics), so it raises a ``RuntimeError``; run the per-sample pass
  with the model in ``eval()`` mode, or use ``GroupNorm``/``LayerNorm`` as differentially private training
  does;
* random layers (dropout) draw independent masks for each example, as they do in a batch
  (``randomness="different"``), but not the same masks as a separate forward pass; ``randomness="same"``
  shares one draw across the batch and ``"error"`` forbids randomness (see ``torch.func.vmap``);
* only parameters with ``requires_grad=True`` get per-sample gradients; frozen parameters and buffers are
  constants;
* ``chunk_size`` bounds the memory of the vectorized pass by running the batch in chunks of that many
  examples (the result is the same);
* the computation runs on the model's device and in its dtype (float32, float64, ...).

.. code-block:: python

    grads = per_sample_grads(model, torch.nn.functional.cross_entropy, x, y)  # {name: (b, *p.shape)}
    flat = flatten_per_sample(grads)  # (b, d)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from optimlab._core.validation import Choice, Interval

__all__ = ["flatten_per_sample", "per_sample_grads", "per_sample_grads_and_losses"]

Inputs = Tensor | tuple[Tensor, ...] | list[Tensor]
_RANDOMNESS = ("different", "same", "error")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"per-sample gradients need an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            raise RuntimeError(
                f"module {name or type(model).__name__!r} is {type(module).__name__} in training mode: its output for "
                "one example depends on the rest of the batch, so per-sample gradients are undefined. Call "
                "model.eval() around the per-sample pass (batch statistics are then the running ones), or use "
                "GroupNorm/LayerNorm instead"
            )
        if isinstance(module, _InstanceNorm) and module.training and module.track_running_stats:
            raise RuntimeError(
                f"module {name!r} is {type(module).__name__} with track_running_stats=True in training mode, which "
                "writes its running statistics in the forward pass; call model.eval() around the per-sample pass"
            )


def _batch_size(inputs: tuple[Tensor, ...], targets: Tensor | None) -> int:
    tensors = [*inputs, *(() if targets is None else (targets,))]
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("inputs (a tensor or a tuple of tensors) and targets (a tensor or None) must be tensors")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in tensors}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every input and the targets need the same batch size along dim 0; got shapes "
            + ", ".join(str(tuple(t.shape)) for t in tensors)
        )
    return sizes.pop()


def per_sample_grads_and_losses(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Inputs,
    targets: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    randomness: str = "different",
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients and per-sample losses of ``loss_fn(model(*inputs), targets)``.

    ``inputs`` is the batch (a tensor, or a tuple of tensors passed to ``forward`` as positional arguments), every
    tensor batched along dim 0; ``targets`` is a tensor batched the same way, or ``None`` to call
    ``loss_fn(outputs)``. ``loss_fn`` must return a scalar. Returns ``(grads, losses)``: ``grads`` maps the name of
    every trainable parameter (as in ``model.named_parameters()``) to a tensor of shape ``(b, *param.shape)``, and
    ``losses`` has shape ``(b,)``. See the module docstring for the conventions.
    """
    _check_model(model)
    Choice(_RANDOMNESS).check("randomness", randomness)
    if chunk_size is not None:
        Interval(1, integer=True).check("chunk_size", chunk_size)
    batched_inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    _batch_size(batched_inputs, targets)

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True: there is nothing to differentiate")
    constants: dict[str, Tensor] = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    constants.update((n, b.detach()) for n, b in model.named_buffers())

    def example_loss(params: dict[str, Tensor], example: tuple[Tensor, ...], target: Tensor | None) -> Tensor:
        # a batch of one example, so that the model and the loss see the shapes they expect
        outputs = functional_call(model, (params, constants), tuple(x.unsqueeze(0) for x in example))
        loss = loss_fn(outputs) if target is None else loss_fn(outputs, target.unsqueeze(0))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (reduction 'mean' or 'sum'); got {shape}")
        return loss

    target_dim = None if targets is None else 0
    per_example = vmap(
        grad_and_value(example_loss), in_dims=(None, 0, target_dim), chunk_size=chunk_size, randomness=randomness
    )
    grads, losses = per_example(trainable, batched_inputs, targets)
    return grads, losses


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Inputs,
    targets: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    randomness: str = "different",
) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss_fn(model(*inputs), targets)``: ``{name: tensor of shape (b, *param.shape)}``
    (see :func:`per_sample_grads_and_losses` for the arguments)."""
    grads, _ = per_sample_grads_and_losses(
        model, loss_fn, inputs, targets, chunk_size=chunk_size, randomness=randomness
    )
    return grads


def flatten_per_sample(grads: Mapping[str, Tensor] | Any) -> Tensor:
    """Per-sample gradients as one ``(b, d)`` matrix: row ``i`` is example ``i``'s gradient over every parameter, in
    the order of ``grads`` (a mapping as returned by :func:`per_sample_grads`, or a sequence of ``(b, ...)``
    tensors)."""
    blocks = list(grads.values()) if isinstance(grads, Mapping) else list(grads)
    if not blocks:
        raise ValueError("no per-sample gradients to flatten")
    return torch.cat([g.reshape(g.shape[0], -1) for g in blocks], dim=1)
