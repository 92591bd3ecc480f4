"""One trial: train a workload's model with one optimizer, hyperparameters and seed, and record what happened.

Every optimizer gets the same schedule around its learning rate: a linear warm-up over the first 2 % of the
step budget, then cosine decay to zero at the budget (AlgoPerf's shape). Time counts training only
(evaluations are excluded) and stops the run at the workload's wall-clock budget. A non-finite training or
validation loss ends the trial as ``diverged`` (the NaN policy), and an exception raised by the optimizer ends
it as ``error``: neither stops the study.

The per-evaluation log is the record's ``curve``. Besides loss, metric and the ℓ1/ℓ2 norms of the gradient
(the refined schedule of arXiv 2310.07831 is computed from them), an optimizer or a task may add columns of its
own by defining ``bench_metrics() -> dict[str, float]`` (e.g. bytes communicated by a distributed method).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import optimlab
from optimlab.bench.records import CURVE_COLUMNS, TrialRecord
from optimlab.bench.workloads.base import Workload
from optimlab.registry import optimizer_class

__all__ = ["resolve_optimizer", "run_trial", "lr_range", "environment"]

_TORCH_LR_RANGE = (1e-4, 1e-1)


def resolve_optimizer(spec: str) -> Callable[..., torch.optim.Optimizer]:
    """A factory ``(params, **hparams) -> optimizer`` for an optimizer spec: anything
    :func:`optimlab.registry.optimizer_class` accepts (``adan``, ``torch:AdamW``, ``package.module:Class``), or a
    registry wrapper around such a spec (``orthograd(torch:AdamW)``), the hyperparameters going to the inner one.
    """
    wrapped = _split_wrapper(spec)
    if wrapped is not None:
        wrapper, inner = wrapped
        info = _registry_entry(wrapper, "wrapper")
        make_inner = resolve_optimizer(inner)
        return lambda params, **hp: info.cls(make_inner(params, **hp))
    if spec in optimlab.available("wrapper"):
        raise ValueError(f"{spec!r} is a wrapper: name the optimizer it wraps, e.g. {spec}(torch:AdamW)")
    return optimizer_class(spec)


def _split_wrapper(spec: str) -> tuple[str, str] | None:
    """``(wrapper, inner)`` of a ``wrapper(inner)`` spec, else None."""
    if spec.endswith(")") and "(" in spec:
        wrapper, inner = spec[:-1].split("(", 1)
        return wrapper, inner
    return None


def _registry_entry(name: str, kind: str):
    if name not in optimlab.available(kind):
        raise ValueError(f"unknown {kind} {name!r}; the {kind}s are {', '.join(optimlab.available(kind))}")
    return optimlab.get(name)


def lr_range(spec: str) -> tuple[float, float]:
    """The learning-rate range a fair tuner searches for ``spec``: its registry entry's, else a broad default."""
    wrapped = _split_wrapper(spec)
    if wrapped is not None:  # a wrapper is tuned over the range of the optimizer it wraps
        return lr_range(wrapped[1])
    if spec in optimlab.available("optimizer"):
        return optimlab.get(spec).lr_range
    return _TORCH_LR_RANGE


def _warmup_cosine(total: int) -> Callable[[int], float]:
    warmup = max(1, round(0.02 * total))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total - warmup))))

    return factor


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def _grad_norms(params: list[torch.Tensor]) -> tuple[float, float]:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, 0.0
    l1 = sum(float(g.abs().sum()) for g in grads)
    l2 = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    return l1, l2


def run_trial(
    workload: Workload, optimizer: str, hparams: dict[str, Any], seed: int, *, phase: str, env: dict[str, Any] | None = None
) -> TrialRecord:
    """Run one trial to its budget (or to divergence) and return its record."""
    record = TrialRecord(
        workload=workload.name,
        optimizer=optimizer,
        hparams=dict(hparams),
        seed=seed,
        phase=phase,
        status="ok",
        metric=workload.metric,
        higher_is_better=workload.higher_is_better,
        target=workload.target,
        curve={c: [] for c in CURVE_COLUMNS},
        env={**(env or {}), "started": _now()},
    )
    torch.manual_seed(seed)
    task = workload.build(seed)
    params = [p for p in task.model.parameters() if p.requires_grad]
    try:
        factory = resolve_optimizer(optimizer)
        _warm_up(factory, hparams, params)
        opt = factory(params, **hparams)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(workload.max_steps))
        _train(workload, task, opt, schedule, params, record)
    except Exception as err:  # an optimizer's failure is a result, not a crash of the study
        record.status = "error"
        record.error = "".join(traceback.format_exception_only(type(err), err)).strip()
    if record.status != "error":
        record.test = {k: float(v) for k, v in task.evaluate("test").items()}
    record.env["finished"] = _now()
    return record


@torch.no_grad()
def _warm_up(factory: Callable[..., torch.optim.Optimizer], hparams: dict[str, Any], params: list[torch.Tensor]) -> None:
    """Two steps of a throwaway optimizer on copies of the parameters, untimed: one-time costs (compiling a
    kernel, lazy imports) stay out of the trial's seconds. The trial's own parameters and RNG are untouched."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in copies:
        p.grad = torch.zeros_like(p)
    warm = factory(copies, **hparams)
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            warm.step()


def _train(workload, task, opt, schedule, params, record: TrialRecord) -> None:
    grad_evals = 0
    step = 0

    def closure() -> torch.Tensor:
        nonlocal grad_evals
        opt.zero_grad(set_to_none=True)
        loss = task.train_loss(step)
        loss.backward()
        grad_evals += 1
        return loss

    seconds = 0.0
    for step in range(workload.max_steps):
        start = time.perf_counter()
        loss = opt.step(closure)
        schedule.step()
        seconds += time.perf_counter() - start
        last = step + 1 == workload.max_steps or seconds >= workload.max_seconds
        if (step + 1) % workload.eval_every and not last:
            continue
        train_loss = loss.item()
        val = task.evaluate("val")
        _log(record, opt, task, params, step + 1, grad_evals, seconds, train_loss, val, workload.metric)
        if not (math.isfinite(train_loss) and math.isfinite(val["loss"]) and math.isfinite(val[workload.metric])):
            record.status = "diverged"
            break
        if record.steps_to_target is None and workload.reached(val[workload.metric]):
            record.steps_to_target, record.grad_evals_to_target = step + 1, grad_evals
            record.seconds_to_target = seconds
        if last:
            break
    record.steps, record.grad_evals, record.seconds = step + 1, grad_evals, seconds
    values = [v for v in record.curve["val_metric"] if math.isfinite(v)]
    record.final_val = record.curve["val_metric"][-1] if record.curve["val_metric"] else None
    if values:
        record.best_val = max(values) if workload.higher_is_better else min(values)
    record.state_bytes = _state_bytes(opt)


def _log(record, opt, task, params, step, grad_evals, seconds, train_loss, val, metric) -> None:
    l1, l2 = _grad_norms(params)
    row = {
        "step": step,
        "grad_evals": grad_evals,
        "seconds": seconds,
        "train_loss": train_loss,
        "val_loss": float(val["loss"]),
        "val_metric": float(val[metric]),
        "grad_l1": l1,
        "grad_l2": l2,
    }
    for source in (opt, task):
        extra = getattr(source, "bench_metrics", None)
        if callable(extra):
            row.update({k: float(v) for k, v in extra().items()})
    rows_before = len(record.curve["step"])
    for key, value in row.items():
        record.curve.setdefault(key, [math.nan] * rows_before).append(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def environment(jobs: int) -> dict[str, Any]:
    """Versions, machine and settings, recorded with every trial (which adds its own ``threads``)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "optimlab": optimlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "jobs": jobs,
        "git_sha": sha or None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
