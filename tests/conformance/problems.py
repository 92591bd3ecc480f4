"""Small deterministic problems the battery trains on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SHAPES: tuple[tuple[int, ...], ...] = ((4, 3), (5,), (1,))


def make_params(shapes: Sequence[tuple[int, ...]] = SHAPES, dtype=torch.float64, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def needs_graph(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` differentiates the gradient again (AdaHessian): its backward passes keep the graph."""
    info = getattr(type(opt), "info", None)
    return info is not None and info.capabilities.needs_create_graph


def per_sample(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` steps on per-example gradients (DP-SGD, DiceSGD) rather than on ``p.grad``."""
    info = getattr(type(opt), "info", None)
    return info is not None and info.capabilities.per_sample_grads


def attach_per_sample(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """For an optimizer on per-example gradients, present each ``p.grad`` as a batch of one example
    (``p.grad_sample``, Opacus's attribute), so every check drives it with the same gradients as the others."""
    if per_sample(opt):
        for p in params:
            p.grad_sample = None if p.grad is None else p.grad.detach().unsqueeze(0)


def backward(loss: Tensor, opt: torch.optim.Optimizer) -> None:
    """``loss.backward()``, with ``create_graph=True`` for an optimizer that needs it (and the gradients as a batch
    of one example for an optimizer on per-example gradients)."""
    loss.backward(create_graph=needs_graph(opt))
    attach_per_sample(opt, [p for group in opt.param_groups for p in group["params"]])


def set_gradients(opt: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """``p.grad = g``; for an optimizer that differentiates the gradient again, ``g`` arrives from a backward pass
    of ``Σ <g, p> + ½‖p − p₀‖²`` at ``p = p₀`` (gradient exactly ``g``, Hessian the identity)."""
    if not needs_graph(opt):
        for p, g in zip(params, grads):
            p.grad = g
        attach_per_sample(opt, params)
        return
    for p in params:
        p.grad = None
    sum((g * p).sum() + 0.5 * ((p - p.detach()) ** 2).sum() for p, g in zip(params, grads)).backward(create_graph=True)


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


class SeparableQuadratic:
    """loss = Σ_i ½ Σ a_i ⊙ (p_i − b_i)²: each tensor's gradient depends on that tensor alone."""

    def __init__(self, shapes: Sequence[tuple[int, ...]] = SHAPES, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.a = [torch.rand(s, generator=gen, dtype=torch.float64) * 4 + 0.5 for s in shapes]
        self.b = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    def loss(self, params: Sequence[Tensor]) -> Tensor:
        return sum((0.5 * a.to(p.dtype) * (p - b.to(p.dtype)) ** 2).sum() for p, a, b in zip(params, self.a, self.b))

    def closure(self, opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = self.loss(params)
            backward(loss, opt)
            return loss

        return closure


def train(
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    problem: SeparableQuadratic,
    steps: int,
    *,
    skip: Callable[[int, int], bool] = lambda step, i: False,
    set_to_none: bool = True,
) -> None:
    """``steps`` steps with autograd gradients; ``skip(step, i)`` leaves parameter i without a gradient."""
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        live = [(p, a, b) for i, (p, a, b) in enumerate(zip(params, problem.a, problem.b)) if not skip(step, i)]
        if live:
            backward(sum((0.5 * a.to(p.dtype) * (p - b.to(p.dtype)) ** 2).sum() for p, a, b in live), opt)
        opt.step()


def rosenbrock(x: Tensor) -> Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
