"""Shared machinery of the parity tests: one seeded problem, one driver, written once.

Every parity test runs two optimizers side by side on identical float64 parameters and compares the
parameters after every step. Gradients come from a fixed random convex quadratic plus seeded noise, so they
depend on each optimizer's own path: a difference in one step changes every later gradient and cannot hide.
Each optimizer gets a fresh *copy* of the gradient on every step, because some peers write into ``p.grad``
(L2 decay, clipping, OrthoGrad), which must not leak into the other run.

The peers are required test dependencies (the ``test`` extra), so they are imported normally by the test
modules: a missing peer is an error, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

SHAPES: tuple[tuple[int, ...], ...] = ((5, 3), (4,), (1,))  # a matrix, a vector, a scalar-like tensor
STEPS = 50


class Problem:
    """f(θ) = ½ θᵀHθ + bᵀθ over all parameters flattened together, H symmetric positive definite.

    ``grads(params, t)`` returns ``scale·(Hθ + b + noise·ε_t)`` split per parameter, where ε_t ~ N(0, I) comes
    from a generator seeded by (seed, t) alone, so two runs see the same noise at step t whatever their order.
    ``zero_every`` > 0 sets every that-many-th gradient coordinate to exactly 0 on every step (the sign(0) path).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]] = SHAPES,
        seed: int = 0,
        noise: float = 0.1,
        scale: float = 1.0,
        zero_every: int = 0,
    ) -> None:
        self.shapes, self.seed, self.noise, self.scale = tuple(shapes), seed, noise, scale
        self.sizes = [torch.Size(s).numel() for s in self.shapes]
        n = sum(self.sizes)
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        self.h = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
        self.b = torch.randn(n, generator=gen, dtype=torch.float64)
        self.theta0 = torch.randn(n, generator=gen, dtype=torch.float64)
        self.keep = torch.ones(n, dtype=torch.float64)
        if zero_every:
            self.keep[::zero_every] = 0.0

    def init(self) -> list[torch.Tensor]:
        """Fresh leaf parameters with the same initial values on every call."""
        return [x.clone().view(s).requires_grad_(True) for x, s in zip(self.theta0.split(self.sizes), self.shapes)]

    def grads(self, params: Sequence[torch.Tensor], t: int) -> list[torch.Tensor]:
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        eps = torch.randn(
            theta.numel(), generator=torch.Generator().manual_seed(1_000_003 * self.seed + t), dtype=torch.float64
        )
        g = self.scale * (self.h @ theta + self.b + self.noise * eps) * self.keep
        return [x.view(s) for x, s in zip(g.split(self.sizes), self.shapes)]


Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def trajectory(
    make_opt: Factory, problem: Problem | None = None, steps: int = STEPS, late: int = 0, late_index: int = 1
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor | None]]]:
    """Run ``make_opt(params)`` for ``steps`` steps; return the parameters after each step and the gradients fed.

    With ``late`` = k > 0, parameter ``late_index`` has ``grad = None`` on the first k steps.
    """
    problem = problem or Problem()
    params = problem.init()
    opt = make_opt(params)
    thetas, fed = [], []
    for t in range(steps):
        grads = [None if (i == late_index and t < late) else g for i, g in enumerate(problem.grads(params, t))]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        thetas.append([p.detach().clone() for p in params])
        fed.append(grads)
    return thetas, fed


def max_diff(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float:
    """Largest |a - b| over all steps and parameters of two trajectories."""
    return max((x - y).abs().max().item() for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def bitwise_equal(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    """True when two trajectories are identical bit for bit (``torch.equal`` at every step)."""
    return all(torch.equal(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def run_pair(
    make_ours: Factory,
    make_peer: Factory,
    steps: int = STEPS,
    problem: Problem | None = None,
    late: int = 0,
) -> float:
    """Max |Δθ| over all steps between two optimizers run on the same problem (see :func:`trajectory`)."""
    problem = problem or Problem()
    ours, _ = trajectory(make_ours, problem, steps, late)
    peer, _ = trajectory(make_peer, problem, steps, late)
    return max_diff(ours, peer)
