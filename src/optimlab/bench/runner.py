"""One trial: train a workload's model with one optimizer, hyperparameters and seed, and record what happened.

Every optimizer gets the same schedule around its learning rate: by default a linear warm-up over the first
2 % of the step budget, then cosine decay to zero at the budget (AlgoPerf's shape); a spec's ``@linear`` or
``@refined`` suffix asks for linear decay or the refined schedule instead (:mod:`optimlab.bench.specs`). Time
counts training only (evaluations are excluded) and stops the run at the workload's wall-clock budget. A non-finite training or
validation loss ends the trial as ``diverged`` (the NaN policy), and an exception raised by the optimizer ends
it as ``error``: neither stops the study.

The per-evaluation log is the record's ``curve``. Besides loss, metric and the ℓ1/ℓ2 norms of the gradient, an
optimizer or a task may add columns of its own by defining ``bench_metrics() -> dict[str, float]`` (e.g. bytes
communicated by a distributed method).
Trials with a ``linear`` or ``refined`` schedule also log both gradient norms at every step
(``record.grad_norms``): the refined schedule of arXiv 2310.07831 is computed from them, by the bench itself or
by ``optimlab schedule refine``.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import optimlab
from optimlab.bench.data_parallel import DataParallelStep, DDPStep, allreduce_bytes, is_data_parallel
from optimlab.bench.records import CURVE_COLUMNS, TrialRecord
from optimlab.bench.specs import OptimizerSpec, parse_spec
from optimlab.bench.workloads.base import Workload
from optimlab.registry import optimizer_class
from optimlab.schedules import linear_decay, refine

__all__ = [
    "resolve_optimizer",
    "check_spec",
    "run_trial",
    "lr_range",
    "lr_factor",
    "needs_create_graph",
    "model_param_groups",
    "environment",
]

_TORCH_LR_RANGE = (1e-4, 1e-1)
WARMUP_FRACTION = 0.02


def resolve_optimizer(spec: str | OptimizerSpec) -> Callable[..., torch.optim.Optimizer]:
    """A factory ``(params, **hparams) -> optimizer`` for an optimizer spec (grammar in
    :mod:`optimlab.bench.specs`): anything :func:`optimlab.registry.optimizer_class` accepts (``adan``,
    ``torch:AdamW``, ``package.module:Class``), with fixed hyperparameters (``torch:AdamW[weight_decay=0]``), or
    a registry wrapper around such a spec (``orthograd(torch:AdamW)``); the tuned hyperparameters go to the
    innermost optimizer. The schedule suffix does not change the factory.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.inner is not None:
        info = _registry_entry(parsed.name, "wrapper")
        make_inner = resolve_optimizer(parsed.inner)
        return lambda params, **hp: info.cls(make_inner(params, **hp), **parsed.fixed)
    if parsed.name in optimlab.available("wrapper"):
        raise ValueError(f"{parsed.name!r} is a wrapper: name the optimizer it wraps, e.g. {parsed.name}(torch:AdamW)")
    cls = optimizer_class(parsed.name)
    if not parsed.fixed:
        return cls
    return lambda params, **hp: cls(params, **{**parsed.fixed, **hp})


def check_spec(spec: str | OptimizerSpec, workload: Workload) -> None:
    """Raise ValueError if ``spec`` cannot train on ``workload``: an unknown name, or a distributed method
    (communication scheme, aggregator) on a workload without simulated workers."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if not is_data_parallel(parsed, workload):
        resolve_optimizer(parsed)


def needs_create_graph(spec: str | OptimizerSpec) -> bool:
    """Whether the spec's optimizer reads second derivatives (AdaHessian): its trials then run
    ``loss.backward(create_graph=True)``."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    info = getattr(optimizer_class(parsed.innermost.name), "info", None)
    return info is not None and info.capabilities.needs_create_graph


def model_param_groups(spec: str | OptimizerSpec, model: torch.nn.Module) -> list[Any]:
    """What the spec's optimizer is built on: its class's ``model_param_groups(model)`` where it defines one (the
    paper's split of a model's parameters, e.g. FRUGAL's projectable and regular matrices), else the model's
    trainable parameters."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    split = getattr(optimizer_class(parsed.innermost.name), "model_param_groups", None)
    if split is not None:
        return split(model)
    return [p for p in model.parameters() if p.requires_grad]


def _registry_entry(name: str, kind: str):
    if name not in optimlab.available(kind):
        raise ValueError(f"unknown {kind} {name!r}; the {kind}s are {', '.join(optimlab.available(kind))}")
    return optimlab.get(name)


def lr_range(spec: str) -> tuple[float, float]:
    """The learning-rate range a fair tuner searches for ``spec``: its innermost optimizer's registry range (a
    wrapper is tuned over the range of the optimizer it wraps; a distributed method over the range of the step it
    drives), else a broad default."""
    name = parse_spec(spec).innermost.name
    if name in optimlab.REGISTRY and optimlab.get(name).lr_range is not None:
        return optimlab.get(name).lr_range
    return _TORCH_LR_RANGE


def lr_factor(spec: str | OptimizerSpec, total: int, source: TrialRecord | None = None) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at 0-based step ``t`` for the spec's schedule over ``total``
    steps (see :mod:`optimlab.bench.specs`); a ``refined`` schedule needs the ``source`` trial's norm log."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    warmup = max(1, round(WARMUP_FRACTION * total))
    if parsed.schedule == "linear":
        return lambda t: linear_decay(t, total, warmup)
    if parsed.schedule == "refined":
        norm = parsed.refinement_norm
        norms = (source.grad_norms.get(norm) if source is not None and source.status == "ok" else None) or []
        if not norms:
            raise ValueError(
                f"no gradient-norm log to refine {parsed} from: the linear-decay trial at this learning rate "
                f"{'is missing' if source is None else 'did not finish (' + source.status + ')'}"
            )
        if len(norms) != total:
            raise ValueError(
                f"the linear-decay trial's gradient-norm log covers {len(norms)} of {total} steps (it stopped at "
                "the wall-clock budget): a refined schedule needs a log of the whole run"
            )
        multipliers = refine(norms, norm=norm, steps=total).tolist()
        return lambda t: multipliers[min(t, total - 1)]

    def cosine(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total - warmup))))

    return cosine


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def run_trial(
    workload: Workload,
    optimizer: str,
    hparams: dict[str, Any],
    seed: int,
    *,
    phase: str,
    env: dict[str, Any] | None = None,
    schedule_source: TrialRecord | None = None,
    ranks: bool = False,
) -> TrialRecord:
    """Run one trial to its budget (or to divergence) and return its record. A ``refined`` spec's schedule is
    computed from ``schedule_source``, the finished ``linear`` trial it refines. With ``ranks`` this process is one
    rank of a data-parallel trial on real processes (``optimlab bench --torchrun``, :mod:`optimlab.bench.torchrun`)."""
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
        spec = parse_spec(optimizer)
        factor = lr_factor(spec, workload.max_steps, schedule_source)
        create_graph = False
        data_parallel = None
        if ranks:
            data_parallel = DDPStep(spec, task, params, hparams, workload, seed)
            opt = data_parallel.optimizer
        elif is_data_parallel(spec, workload):  # trained through the simulator: no warm-up step to hide
            data_parallel = DataParallelStep(spec, params, hparams, workload, seed)
            opt = data_parallel.optimizer
        else:
            factory = resolve_optimizer(spec)
            create_graph = needs_create_graph(spec)
            _warm_up(factory, hparams, params, create_graph=create_graph)
            opt = factory(model_param_groups(spec, task.model), **hparams)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        log_norms = spec.schedule in ("linear", "refined")
        _train(workload, task, opt, schedule, params, record, log_norms=log_norms, create_graph=create_graph,
               data_parallel=data_parallel)
    except Exception as err:  # an optimizer's failure is a result, not a crash of the study
        record.status = "error"
        record.error = "".join(traceback.format_exception_only(type(err), err)).strip()
    if record.status != "error":
        record.test = {k: float(v) for k, v in task.evaluate("test").items()}
    record.env["finished"] = _now()
    return record


def _warm_up(
    factory: Callable[..., torch.optim.Optimizer],
    hparams: dict[str, Any],
    params: list[torch.Tensor],
    *,
    create_graph: bool = False,
) -> None:
    """Two steps of a throwaway optimizer on copies of the parameters, untimed: one-time costs (compiling a
    kernel, lazy imports) stay out of the trial's seconds. The trial's own parameters and RNG are untouched.
    The gradients are zeros; with ``create_graph`` they come from a zero loss's backward, so a second-order
    optimizer finds the graph it differentiates."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with warnings.catch_warnings():  # advice about a flat parameter list (FRUGAL's) is for the trial's own build
        warnings.simplefilter("ignore", UserWarning)
        warm = factory(copies, **hparams)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(2):
            if create_graph:
                warm.zero_grad(set_to_none=True)
                _backward(sum((0.0 * c.square()).sum() for c in copies), create_graph=True)
            else:
                for c in copies:
                    c.grad = torch.zeros_like(c)
            warm.step()
    warm.zero_grad(set_to_none=True)  # frees a gradient graph now (it references its parameter)


def _backward(loss: torch.Tensor, create_graph: bool) -> None:
    if not create_graph:  # the usual step: no warning to silence, no filter state to save and restore
        loss.backward()
        return
    with warnings.catch_warnings():
        # torch warns that a graph in p.grad references its parameter; the next zero_grad(set_to_none=True) (and
        # the end of the trial) breaks that cycle
        warnings.filterwarnings("ignore", r"Using backward\(\) with create_graph=True", UserWarning)
        loss.backward(create_graph=True)


def _train(
    workload,
    task,
    opt,
    schedule,
    params,
    record: TrialRecord,
    *,
    log_norms: bool = False,
    create_graph: bool = False,
    data_parallel: DataParallelStep | DDPStep | None = None,
) -> None:
    grad_evals = 0
    step = 0
    # per-step ℓ1 and ℓ2 norms of the gradient each step used, kept on the device until the end (no sync per step)
    norms = None
    if log_norms:
        device = params[0].device
        norms = torch.full((workload.max_steps, 2), math.nan, dtype=_norm_dtype(device), device=device)

    def closure() -> torch.Tensor:
        nonlocal grad_evals
        opt.zero_grad(set_to_none=True)
        loss = task.train_loss(step)
        _backward(loss, create_graph)
        grad_evals += 1
        return loss

    # what else logs columns of its own: the data-parallel method (its bytes), or DDP's all-reduce it stands for
    extra_metrics = data_parallel
    if data_parallel is None and workload.workers > 1:
        sent = float(allreduce_bytes(params))
        extra_metrics = SimpleNamespace(bench_metrics=lambda: {"bytes_per_worker": sent})

    seconds = 0.0
    for step in range(workload.max_steps):
        start = time.perf_counter()
        if data_parallel is None:
            loss = opt.step(closure)
        else:
            loss = data_parallel(task, step)
            grad_evals += 1
        schedule.step()
        seconds += time.perf_counter() - start
        if data_parallel is not None:  # on real ranks: the slowest rank's, so that all stop at the same step
            seconds = data_parallel.elapsed(seconds)
        pair = None
        if norms is not None:
            norms[step] = pair = _grad_norm_pair(params)
        last = step + 1 == workload.max_steps or seconds >= workload.max_seconds
        if (step + 1) % workload.eval_every and not last:
            continue
        train_loss = loss.item()
        val = task.evaluate("val")
        pair = _grad_norm_pair(params) if pair is None else pair  # an evaluated step's norms, computed once
        _log(record, (opt, task, extra_metrics), pair, step + 1, grad_evals, seconds, train_loss, val, workload.metric)
        if not (math.isfinite(train_loss) and math.isfinite(val["loss"]) and math.isfinite(val[workload.metric])):
            record.status = "diverged"
            break
        if record.steps_to_target is None and workload.reached(val[workload.metric]):
            record.steps_to_target, record.grad_evals_to_target = step + 1, grad_evals
            record.seconds_to_target = seconds
        if last:
            break
    record.steps, record.grad_evals, record.seconds = step + 1, grad_evals, seconds
    if norms is not None:
        logged = norms[: step + 1].cpu()
        record.grad_norms = {"l1": logged[:, 0].tolist(), "l2": logged[:, 1].tolist()}
    values = [v for v in record.curve["val_metric"] if math.isfinite(v)]
    record.final_val = record.curve["val_metric"][-1] if record.curve["val_metric"] else None
    if values:
        record.best_val = max(values) if workload.higher_is_better else min(values)
    record.state_bytes = _state_bytes(opt)
    if create_graph:  # a gradient with a graph references its parameter: break the cycle now, not at gc time
        opt.zero_grad(set_to_none=True)


def _norm_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _grad_norm_pair(params: list[torch.Tensor]) -> torch.Tensor:
    """(ℓ1, ℓ2) norms of all the gradients as one vector on the parameters' device (no host sync)."""
    device = params[0].device
    dtype = _norm_dtype(device)
    grads = [p.grad.detach().reshape(-1) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(2, dtype=dtype, device=device)
    l1 = torch.stack([g.abs().sum(dtype=dtype) for g in grads]).sum()
    l2 = torch.stack([g.to(dtype).square().sum() for g in grads]).sum().sqrt()
    return torch.stack([l1, l2])


def _log(record, sources, grad_norms, step, grad_evals, seconds, train_loss, val, metric) -> None:
    l1, l2 = grad_norms.tolist()
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
    for source in sources:
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
