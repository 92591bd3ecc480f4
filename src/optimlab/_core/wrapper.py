"""The wrapper contract: a transform of the gradient in front of any ``torch.optim.Optimizer``.

A wrapper holds an inner optimizer (ours, torch's or a peer's) and *is* that optimizer to the outside world:
``param_groups``, ``state``, ``defaults``, ``state_dict``, ``load_state_dict``, ``zero_grad`` and
``add_param_group`` all go to the inner one, so LR schedulers, ``GradScaler`` and checkpoints work through it.
On ``step()`` the wrapper hands the inner optimizer transformed gradients and puts the caller's gradients back
afterwards: ``p.grad`` is the same tensor, with the same values, before and after ``step()``.

A subclass implements ``_transform(group, params, grads) -> new_grads`` (out of place), called once per param group
that has gradients. A transform that couples param groups (a threshold over every gradient of the model, as
coordinate-wise clipping takes) overrides ``_transform_all(batches) -> new_grads_per_batch`` instead, which sees
every group's ``(group, params, grads)`` at once; its default calls ``_transform`` per group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from optimlab._core.optimizer import evaluate_closure
from optimlab._core.validation import check_hyperparameters

if TYPE_CHECKING:
    from optimlab.registry import MethodInfo

__all__ = ["Batch", "OptimizerWrapper"]

# one param group with gradients: the group, its parameters that have a gradient, and those gradients
Batch = tuple[dict[str, Any], list[Tensor], list[Tensor]]


class OptimizerWrapper(torch.optim.Optimizer):
    """Base class of gradient-transforming wrappers (see the module docstring)."""

    info: ClassVar[MethodInfo]

    def __init__(self, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                f"build the optimizer first, e.g. {type(self).__name__}(torch.optim.AdamW(model.parameters()))"
            )
        inner_info = getattr(type(optimizer), "info", None)
        if inner_info is not None and inner_info.capabilities.needs_closure:
            raise TypeError(
                f"{type(self).__name__} transforms gradients before an optimizer's step; "
                f"{type(optimizer).__name__} computes its own from a special closure, so there is nothing to wrap"
            )
        if inner_info is not None and inner_info.capabilities.needs_create_graph:
            raise TypeError(
                f"{type(self).__name__} hands its inner optimizer transformed gradients, which carry no autograd "
                f"graph; {type(optimizer).__name__} differentiates the gradient a second time, so it cannot be wrapped"
            )
        check_hyperparameters(self.info.hyperparameters, options)
        # Deliberately not calling Optimizer.__init__: the groups and state are the inner optimizer's.
        self.optimizer = optimizer
        self.options = options
        for hooks in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()

    # Everything a scheduler, a scaler or a checkpoint touches is the inner optimizer's.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts}, optimizer={self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (if given), transform the gradients, step the inner optimizer, restore grads."""
        loss = evaluate_closure(closure)
        batches: list[Batch] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                batches.append((group, params, [p.grad for p in params]))
        transformed = self._transform_all(batches)
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            for (_, params, _), new_grads in zip(batches, transformed, strict=True):
                for p, g in zip(params, new_grads, strict=True):
                    saved.append((p, p.grad))
                    p.grad = g
            self.optimizer.step()
        finally:
            for p, g in saved:
                p.grad = g
        return loss

    def _transform_all(self, batches: list[Batch]) -> list[list[Tensor]]:
        """New gradients for every batch ``(group, params, grads)`` (one per param group with gradients), out of
        place. Override for a transform that couples groups; the default transforms each group on its own."""
        return [self._transform(group, params, grads) for group, params, grads in batches]

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError
