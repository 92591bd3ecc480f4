"""``rosenbrock`` and ``quadratic``: deterministic test functions of one parameter vector.

No data and no noise: ``train_loss(step)`` is ``f`` at every step, and the "val" and "test" evaluations both
return ``{"loss": f - f*}`` (``f* = 0`` for both). The problems do not depend on the trial seed (every seed
runs the same trajectory for a deterministic optimizer); they test an optimizer's behaviour on curvature, not
generalization.

The parameter is the displacement ``u = x - x*`` from the minimizer, so weight decay (decoupled or L2) pulls
towards the minimizer and never moves it: with the textbook parametrization AdamW's default decay (0.01) would
stall Rosenbrock at f ~ 6e-4 and the quadratic at f ~ 1e-2, and every optimizer's score would depend on its
default decay rather than on how it descends.

- ``rosenbrock``: ``f(x, y) = (1 - x)^2 + 100 (y - x^2)^2`` from the classic start ``(-1.2, 1)`` (``f = 24.2``),
  minimum ``f(1, 1) = 0`` at the end of a long curved valley; the parameter is ``(x - 1, y - 1)``.
- ``quadratic``: ``f(u) = 1/2 u^T A u`` in 50 dimensions, ``A = Q diag(λ) Q^T`` with eigenvalues log-spaced over
  ``[1, 1000]`` (condition number 1000) and a random rotation ``Q`` (so no diagonal preconditioner diagonalizes
  it); the start ``u0`` is a fixed standard normal draw (``f(u0)`` ≈ 3.4e3). The target, 1e-3, is ~3e-7 of it.

Measured with torch AdamW (weight decay 0.01), 1 thread, on this project's 2-core CPU: a step takes ~0.2 ms, a
trial (3,000 steps) ~0.7 s (rosenbrock) and ~0.5 s (quadratic). At a constant lr, ``rosenbrock`` reaches its
1e-3 target at step 650 with lr 0.1 (425 with 0.2, 1,450 with 0.03) and ``quadratic`` at step 700 with lr 0.1
(1,850 with 0.03, 175 with 1.0); lr 1e-2 misses both. Under the bench runner's protocol (2% warm-up, cosine
decay to 0 at ``max_steps``): ``rosenbrock`` at step 950 with lr 0.1 and 1,425 with 6.3e-2, ``quadratic`` at
1,150 and 1,950; lr 2.5e-2 ends at 2e-2 and 0.34. Adam's iterates can blow up again after reaching the target at
a large lr (a constant lr 1.0 ends ``quadratic`` at ~6e-3): what counts is the first evaluation at the target.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from optimlab.bench.workloads._common import generator
from optimlab.bench.workloads.base import Workload

__all__ = ["QUADRATIC", "ROSENBROCK", "FunctionTask", "Vector", "quadratic", "quadratic_problem", "rosenbrock"]

QUADRATIC_DIM, QUADRATIC_CONDITION = 50, 1e3


class Vector(nn.Module):
    """A model that is one parameter vector (its output; calling it lets a DDP wrapper see the forward pass)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return self.x


class FunctionTask:
    """Minimize ``fn(model.x)``; every step sees the same (exact) loss."""

    def __init__(self, fn, init: torch.Tensor) -> None:
        self.fn = fn
        self.model = Vector(init)

    def train_loss(self, step: int) -> torch.Tensor:
        return self.fn(self.model.x)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        if split not in ("val", "test"):
            raise KeyError(f"unknown split {split!r}; expected one of val, test")
        return {"loss": self.fn(self.model.x).item()}


def rosenbrock(u: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's function of the displacement ``u = (x - 1, y - 1)`` from its minimizer."""
    x, y = u[0] + 1, u[1] + 1
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@lru_cache(maxsize=1)
def quadratic_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, u0)`` of the ``quadratic`` workload, fixed (drawn from a constant seed)."""
    g = generator("quadratic")
    q, _ = torch.linalg.qr(torch.randn(QUADRATIC_DIM, QUADRATIC_DIM, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(
        0, torch.log10(torch.tensor(QUADRATIC_CONDITION)).item(), QUADRATIC_DIM, dtype=torch.float64
    )
    a = (q * eigenvalues) @ q.T
    u0 = torch.randn(QUADRATIC_DIM, generator=g, dtype=torch.float64)
    return a.float(), u0.float()


def quadratic(u: torch.Tensor) -> torch.Tensor:
    a = quadratic_problem()[0]
    return 0.5 * u @ (a @ u)


def _build_rosenbrock(seed: int) -> FunctionTask:
    return FunctionTask(rosenbrock, torch.tensor([-2.2, 0.0]))  # (x, y) = (-1.2, 1)


def _build_quadratic(seed: int) -> FunctionTask:
    return FunctionTask(quadratic, quadratic_problem()[1])


def _deterministic(name: str, description: str, build) -> Workload:
    """A known-optimum problem: loss to 1e-3 within 3000 steps (both share the budget and the target)."""
    return Workload(
        name=name,
        description=f"{description}; deterministic",
        metric="loss",
        higher_is_better=False,
        target=1e-3,
        max_steps=3000,
        max_seconds=30.0,
        eval_every=25,
        build=build,
    )


ROSENBROCK = _deterministic(
    "rosenbrock", "2-D Rosenbrock function from (-1.2, 1); loss f(x) (minimum 0 at (1, 1))", _build_rosenbrock
)
QUADRATIC = _deterministic(
    "quadratic", "50-D rotated convex quadratic, condition number 1e3; loss f(x) - f*", _build_quadratic
)
