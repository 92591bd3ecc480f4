"""The workload contract: what a trial needs to train and evaluate one model on one data set.

A ``Workload`` is a declaration (name, metric, target, budgets) plus ``build(seed) -> Task``. A ``Task`` holds
the model and the data for one seed and answers two questions: the training loss of minibatch ``step`` (a
scalar tensor with a graph; deterministic given the seed and the step) and the metrics of a split. Data sets are
made locally or come from an installed package: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["DataParallelTask", "Task", "Workload", "Split"]

Split = str  # "val" or "test"


class Task(Protocol):
    model: torch.nn.Module

    def train_loss(self, step: int) -> torch.Tensor:
        """Loss of the minibatch for ``step`` (0-based), differentiable w.r.t. ``model``'s parameters."""

    def evaluate(self, split: Split) -> dict[str, float]:
        """Metrics on ``split`` ("val" or "test"): at least ``"loss"`` and the workload's ``metric``."""


class DataParallelTask(Task, Protocol):
    """A task whose minibatch is spread over ``n`` simulated workers (the workloads with ``workers > 1``)."""

    def worker_loss(self, step: int, n: int, i: int) -> torch.Tensor:
        """Worker ``i``'s loss on its share of minibatch ``step`` spread over ``n`` workers, computed with
        ``self.model`` (which may be a DDP wrapper on a real rank). The mean over ``i`` has the gradient of the
        whole minibatch's loss (what DDP's all-reduce averages). Each call builds its own graph."""


@dataclass(frozen=True)
class Workload:
    """One benchmark problem. ``target`` is on the validation ``metric``; budgets bound every trial."""

    name: str
    description: str
    metric: str  # a key of Task.evaluate(): "accuracy", "loss", ...
    higher_is_better: bool
    target: float
    max_steps: int
    max_seconds: float
    eval_every: int
    build: Callable[[int], Task]
    quick: bool = True  # part of the --quick suite
    threads: int = 1  # intra-op threads a trial runs with (its timings are taken at this fixed count)
    # the workload this one modifies (another loss, a swapped layer): a variant pairs with it seed by seed in a
    # claim and is run by the suites that compare the two, not by the full suite
    variant_of: str | None = None
    # data-parallel training simulated in one process (optimlab.distributed): the number of workers the minibatch
    # is spread over, and how many of them are Byzantine with which attack (optimlab.distributed.attacks)
    workers: int = 1
    byzantine: int = 0
    attack: str | None = None
    attack_options: tuple[tuple[str, float], ...] = ()  # keyword arguments of the attack, e.g. (("scale", 10.0),)

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target
