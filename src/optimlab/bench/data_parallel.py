"""Data-parallel trials: a distributed method trained in :mod:`optimlab.distributed`'s simulator.

On a workload with ``workers > 1`` (:mod:`optimlab.bench.workloads.distributed`), one step of a distributed
method is: each worker's gradient of its share of the minibatch (``task.worker_loss``), the method's
communication applied to those rows, one update. Which communication depends on the registry kind of the spec's
method:

- "communication" (EF14, EF21, EControl, compressed SGD): the scheme's simulator maps the workers' gradients to
  the direction every replica applies, and plain SGD (``torch.optim.SGD``, the tuned ``lr``) takes the step;
- "aggregator" (Flag, mean, median, trimmed mean, Krum): the workload's Byzantine workers first replace their
  rows by its attack (:data:`optimlab.distributed.attacks.ATTACKS`, drawn from a generator seeded by the trial
  seed), then the rule aggregates and plain SGD steps;
- an optimizer with a simulator of its own (a ``workers`` constructor argument and ``step(worker_grads=G)``, as
  1-bit Adam has): it takes the workers' gradients itself; its warm-up is set from the workload's step budget
  (``total_steps``) unless the spec fixes ``freeze_step``.

The spec's fixed hyperparameters go to the method (``econtrol[eta=0.1,ratio=0.1]``, ``krum[f=3]``); the tuned
learning rate goes to the update. Any other optimizer on such a workload trains on the whole minibatch, whose
gradient is what DDP's all-reduce averages. Every data-parallel trial logs ``bytes_per_worker``, the bytes one
worker sent in the last step (for the others: the fp32 all-reduce of all parameters, DDP's default).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

import optimlab
from optimlab.bench.specs import OptimizerSpec
from optimlab.bench.workloads.base import DataParallelTask, Workload
from optimlab.distributed.attacks import ATTACKS
from optimlab.distributed.simulator import assign_gradient, flat_gradient

__all__ = ["DataParallelStep", "DDPStep", "is_data_parallel", "allreduce_bytes"]


def is_data_parallel(spec: OptimizerSpec, workload: Workload) -> bool:
    """Whether the spec's method trains through the simulator on ``workload`` (rather than on the whole
    minibatch); a communication scheme or an aggregator on a single-worker workload is an error."""
    if spec.inner is not None or spec.name not in optimlab.REGISTRY:
        return False
    kind = optimlab.get(spec.name).kind
    if kind in ("communication", "aggregator"):
        if workload.workers < 2:
            raise ValueError(
                f"{spec.name!r} is a {kind} method: run it on a data-parallel workload (workers > 1), "
                f"not {workload.name!r}"
            )
        return True
    return workload.workers > 1 and kind == "optimizer" and _simulates_workers(optimlab.get(spec.name).cls)


def _simulates_workers(cls: type) -> bool:
    return "workers" in inspect.signature(cls).parameters


def _simulating_optimizer(
    info: Any,
    spec: OptimizerSpec,
    params: list[torch.Tensor],
    hparams: dict[str, Any],
    workload: Workload,
    **extra: Any,
) -> torch.optim.Optimizer:
    """The spec's own data-parallel optimizer (1-bit Adam), its warm-up set from the workload's step budget
    (``total_steps``) unless the spec fixes ``freeze_step``; ``extra`` adds ``workers`` for the simulator."""
    arguments = {**spec.fixed, **hparams, **extra}
    if "total_steps" in inspect.signature(info.cls).parameters and "freeze_step" not in arguments:
        arguments["total_steps"] = workload.max_steps
    return info.cls(params, **arguments)


def _attack(workload: Workload) -> Callable[..., torch.Tensor] | None:
    """The workload's attack with its options bound (``attack(grads, byzantine, generator=...)``), or None."""
    if not workload.byzantine:
        return None
    return functools.partial(ATTACKS[workload.attack], **dict(workload.attack_options))


def allreduce_bytes(params: list[torch.Tensor]) -> int:
    """Bytes one worker hands to DDP's default all-reduce per step: every gradient, in the parameters' dtype."""
    return sum(p.numel() * p.element_size() for p in params)


class DataParallelStep:
    """One simulated data-parallel step of the spec's method on ``params`` (see the module docstring).

    Attributes:
        optimizer: the ``torch.optim.Optimizer`` the learning-rate schedule drives.
    """

    def __init__(
        self, spec: OptimizerSpec, params: list[torch.Tensor], hparams: dict[str, Any], workload: Workload, seed: int
    ) -> None:
        info = optimlab.get(spec.name)
        self.params = params
        self.n_workers = workload.workers
        self._combine: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._bytes: Callable[[], int]
        if info.kind == "optimizer":
            self.optimizer = self._simulated = _simulating_optimizer(
                info, spec, params, hparams, workload, workers=self.n_workers
            )
            self._last_bytes = 0
            self._bytes = lambda: self._last_bytes
            return
        self.optimizer = torch.optim.SGD(params, **hparams)
        if info.kind == "communication":
            scheme = info.cls(**spec.fixed).simulator(self.n_workers)
            self._combine, self._bytes = scheme, lambda: scheme.bytes_per_worker
            return
        aggregator = info.cls(**spec.fixed)
        attack = _attack(workload)
        generator = torch.Generator(device=params[0].device).manual_seed(seed)

        def combine(grads: torch.Tensor) -> torch.Tensor:
            if attack is not None:
                grads = attack(grads, workload.byzantine, generator=generator)
            return aggregator(grads)

        self._combine, self._bytes = combine, lambda: allreduce_bytes(params)  # every worker's full gradient

    def __call__(self, task: DataParallelTask, step: int) -> torch.Tensor:
        """Take training step ``step`` (every worker's share of its minibatch); return the workers' mean loss."""
        rows, losses = [], []
        for i in range(self.n_workers):
            loss = task.worker_loss(step, self.n_workers, i)
            rows.append(flat_gradient(loss, self.params))
            losses.append(loss.detach())
        worker_grads = torch.stack(rows)
        if self._combine is None:
            before = self._simulated.bytes_sent  # cumulative: keep the step's share
            self._simulated.step(worker_grads=worker_grads)
            self._last_bytes = self._simulated.bytes_sent - before
        else:
            assign_gradient(self.params, self._combine(worker_grads))
            self.optimizer.step()
        return torch.stack(losses).mean()

    def bench_metrics(self) -> dict[str, float]:
        return {"bytes_per_worker": float(self._bytes())}

    def elapsed(self, seconds: float) -> float:
        """The trial's seconds so far, as the wall-clock budget is to be checked against (one process: its own)."""
        return seconds


class DDPStep:
    """The same step on real ranks (``optimlab bench --torchrun``): this rank's share of the minibatch through a
    DDP model whose communication hook is the method's, then the update.

    The task's model is replaced by the DDP wrapper (every forward pass goes through it, so the hook fires on
    backward). Communication schemes register their error-feedback hook; aggregators the robust hook, with the
    workload's last ``byzantine`` ranks sending its attack; 1-bit Adam its own hook; any other optimizer DDP's
    average through :func:`optimlab.distributed.comm.allreduce_hook`. ``bytes_per_worker`` is what this rank handed
    to ``torch.distributed`` in the last step for the method (not the adversary's view of the honest gradients that
    simulating a Byzantine attack needs); the returned loss is the workers' mean, as in the simulator.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        task: Any,
        params: list[torch.Tensor],
        hparams: dict[str, Any],
        workload: Workload,
        seed: int,
    ) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from optimlab.distributed.aggregators import RobustHookState, robust_hook
        from optimlab.distributed.comm import Communicator, allreduce_hook, require_process_group
        from optimlab.distributed.onebit_adam import register_onebit_adam

        require_process_group("a --torchrun trial")
        self.rank, self.n_workers = dist.get_rank(), dist.get_world_size()
        if self.n_workers != workload.workers:
            raise ValueError(
                f"world size mismatch: {workload.name} has {workload.workers} workers, the process "
                f"group {self.n_workers} ranks"
            )
        # one bucket for the whole model, so that per-bucket rules (Flag, Krum) see whole gradients as the
        # simulator does
        self.ddp = DistributedDataParallel(task.model, bucket_cap_mb=1024)
        task.model = self.ddp
        info = optimlab.get(spec.name) if spec.inner is None and spec.name in optimlab.REGISTRY else None
        kind = None if info is None else info.kind
        if kind == "optimizer" and is_data_parallel(spec, workload):
            self.optimizer = _simulating_optimizer(info, spec, params, hparams, workload)
            register_onebit_adam(self.ddp, self.optimizer)
            self._comm = self.optimizer.comm
            return
        if kind in ("communication", "aggregator"):
            self.optimizer = torch.optim.SGD(params, **hparams)
        else:
            from optimlab.bench.runner import resolve_optimizer

            self.optimizer = resolve_optimizer(spec)(params, **hparams)
        if kind == "communication":
            self._comm = info.cls(**spec.fixed).register(self.ddp).comm
        elif kind == "aggregator":
            byzantine = tuple(range(self.n_workers - workload.byzantine, self.n_workers))
            state = RobustHookState(
                Communicator(),
                info.cls(**spec.fixed),
                byzantine,
                _attack(workload),
                torch.Generator().manual_seed(seed),
            )
            self.ddp.register_comm_hook(state, robust_hook)
            self._comm = state.comm
        else:
            self._comm = Communicator()
            self.ddp.register_comm_hook(self._comm, allreduce_hook)
        self._last_bytes = 0

    def __call__(self, task: DataParallelTask, step: int) -> torch.Tensor:
        """Take training step ``step`` (this rank's share); return the workers' mean loss, as the simulator does."""
        import torch.distributed as dist

        before = self._comm.bytes_sent
        self.optimizer.zero_grad(set_to_none=True)
        loss = task.worker_loss(step, self.n_workers, self.rank)
        loss.backward()
        self.optimizer.step()
        self._last_bytes = self._comm.bytes_sent - before
        # the logged training loss (not the method's communication: not counted)
        mean_loss = loss.detach() / self.n_workers
        dist.all_reduce(mean_loss)
        return mean_loss

    def bench_metrics(self) -> dict[str, float]:
        return {"bytes_per_worker": float(self._last_bytes)}

    def elapsed(self, seconds: float) -> float:
        """The slowest rank's seconds so far: every rank must stop at the same step on the wall-clock budget (a rank
        that stops alone makes the others' next collective fail), so they check the budget against one number."""
        import torch.distributed as dist

        slowest = torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest)
