"""Data-parallel workloads: a minibatch (or a data set) spread over simulated workers.

A trial with a distributed method (kinds "communication" and "aggregator", and optimizers with a simulator such
as 1-bit Adam) trains through :mod:`optimlab.distributed`'s single-process simulator: each worker's gradient of
:meth:`worker_loss`, the method's communication applied to them, one update. Any other optimizer trains on
the mean of the workers' losses, whose gradient is exactly what DDP's all-reduce averages.

- ``lsq-hetero`` (EControl's kind of problem, arXiv 2311.05645): distributed least squares over 10 workers whose
  data differ in scale (10× from the first to the last) and in the solution each would reach alone (a shared
  offset per worker), so at the optimum no worker's gradient is zero. Each worker computes its exact local
  gradient; ``f(x) = mean_i ½‖A_i x − b_i‖²`` in float64, 40 unknowns, 30 rows per worker. The metric is the
  relative suboptimality ``(f(x) − f*)/(f(x₀) − f*)`` (target 1e-6), ``f*`` from the normal equations. Measured in
  a float64 prototype at constant step sizes 0.01–1, 2,000 steps: gradient descent and EF21/EControl with top-k
  (10 %) reach 1e-7 or below; compressed gradient descent without error feedback stalls at 0.5–0.6 (the mean of
  compressed gradients is not zero at the optimum); EF14 ends at 2e-4–0.3.
- ``mnist1d-cnn-4workers``: ``mnist1d-cnn``'s minibatch of 100 spread over 4 workers (25 examples each).
- ``digits-mlp-byzantine``: ``digits-mlp`` with a minibatch of 150 over 15 workers (10 examples each), 3 of them
  Byzantine (the Flag Aggregator paper's 15 workers and f = 3), each sending ten times its negated gradient
  (sign flip, scale 10). Measured with SGD (seed 1, 1,000 steps, the runner's schedule): the mean diverges at
  every lr from 0.03 to 1 (accuracy ~0.08); Flag reaches 0.958 at lr 0.3 and the 0.965 target at lr 1.0 (step
  350); the coordinate-wise median reaches it at lr 1.0 (step 200). Under large noise (std 100) instead, the
  mean only degrades (0.83-0.92), which makes a weaker claim.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache

import torch

from optimlab.bench.workloads._common import generator, seeded_init
from optimlab.bench.workloads.base import Workload
from optimlab.bench.workloads.classification import ClassificationTask
from optimlab.bench.workloads.digits import DIGITS_MLP, _mlp, digits_splits
from optimlab.bench.workloads.mnist1d_cnn import MNIST1D_CNN
from optimlab.bench.workloads.synthetic import Vector

__all__ = ["LSQ_HETERO", "MNIST1D_CNN_4WORKERS", "DIGITS_MLP_BYZANTINE", "lsq_problem"]

LSQ_WORKERS, LSQ_DIM, LSQ_ROWS = 10, 40, 30


@lru_cache(maxsize=1)
def lsq_problem() -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, b, f*)`` of ``lsq-hetero``: ``A`` is (workers, rows, dim), ``b`` (workers, rows); fixed (constant seed)."""
    g = generator("lsq-hetero")
    a, b = [], []
    for i in range(LSQ_WORKERS):
        scale = 0.2 * 10 ** (i / (LSQ_WORKERS - 1))
        a_i = torch.randn(LSQ_ROWS, LSQ_DIM, generator=g, dtype=torch.float64) * scale / math.sqrt(LSQ_ROWS)
        # each worker's own solution: a shared random vector plus a worker-wide offset (heterogeneous optima)
        x_i = torch.randn(LSQ_DIM, generator=g, dtype=torch.float64) + 3 * torch.randn(
            1, generator=g, dtype=torch.float64
        )
        a.append(a_i)
        b.append(a_i @ x_i)
    a_all, b_all = torch.stack(a), torch.stack(b)
    hessian = torch.einsum("ird,ire->de", a_all, a_all) / LSQ_WORKERS
    x_star = torch.linalg.solve(hessian, torch.einsum("ird,ir->d", a_all, b_all) / LSQ_WORKERS)
    return a_all, b_all, float(_lsq_loss(a_all, b_all, x_star))


def _lsq_loss(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a @ x - b).square().sum(-1).mean()


class LSQTask:
    """Least squares across ``LSQ_WORKERS`` workers, each with its exact local gradient; starts at x = 0."""

    def __init__(self, seed: int) -> None:
        self.a, self.b, self.f_star = lsq_problem()
        self.model = Vector(torch.zeros(LSQ_DIM, dtype=torch.float64))
        self.f0 = float(_lsq_loss(self.a, self.b, self.model.x.detach()))

    def train_loss(self, step: int) -> torch.Tensor:
        return _lsq_loss(self.a, self.b, self.model())

    def worker_loss(self, step: int, n: int, i: int) -> torch.Tensor:
        if n != LSQ_WORKERS:
            raise ValueError(f"lsq-hetero's data are split over {LSQ_WORKERS} workers, not {n}")
        return 0.5 * (self.a[i] @ self.model() - self.b[i]).square().sum()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        if split not in ("val", "test"):
            raise KeyError(f"unknown split {split!r}; expected one of val, test")
        f = float(_lsq_loss(self.a, self.b, self.model()))
        return {"loss": f, "suboptimality": (f - self.f_star) / (self.f0 - self.f_star)}


LSQ_HETERO = Workload(
    name="lsq-hetero",
    description=f"least squares over {LSQ_WORKERS} heterogeneous workers ({LSQ_DIM} unknowns, exact local "
    "gradients, float64); metric (f - f*)/(f0 - f*)",
    metric="suboptimality",
    higher_is_better=False,
    target=1e-6,
    max_steps=1000,
    max_seconds=60.0,
    eval_every=20,
    build=LSQTask,
    quick=False,
    workers=LSQ_WORKERS,
)

MNIST1D_CNN_4WORKERS = replace(
    MNIST1D_CNN,
    name="mnist1d-cnn-4workers",
    description=MNIST1D_CNN.description + ", spread over 4 simulated workers",
    quick=False,
    variant_of="mnist1d-cnn",
    workers=4,
)

BYZANTINE_BATCH, BYZANTINE_WORKERS, BYZANTINE_F = 150, 15, 3


def _build_byzantine(seed: int) -> ClassificationTask:
    train, val, test = digits_splits()
    return ClassificationTask(seeded_init(_mlp, seed), train, val, test, BYZANTINE_BATCH, seed)


DIGITS_MLP_BYZANTINE = replace(
    DIGITS_MLP,
    name="digits-mlp-byzantine",
    description=f"64-128-10 ReLU MLP on scikit-learn's digits, batch {BYZANTINE_BATCH} over {BYZANTINE_WORKERS} "
    f"workers, {BYZANTINE_F} of them Byzantine",
    build=_build_byzantine,
    quick=False,
    variant_of="digits-mlp",
    workers=BYZANTINE_WORKERS,
    byzantine=BYZANTINE_F,
    attack="sign_flip",
    attack_options=(("scale", 10.0),),
)
