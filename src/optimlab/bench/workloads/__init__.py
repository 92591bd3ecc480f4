"""The benchmark workloads, by name. See ``base.py`` for the contract and each family's module for its data,
model, target and measured timings. Nothing here downloads: every data set ships with an installed package
or is generated locally (MNIST-1D's is cached on disk after the first build)."""

from __future__ import annotations

from optimlab.bench.workloads.base import DataParallelTask, Split, Task, Workload
from optimlab.bench.workloads.charlm import CHARLM, CHARLM_4WORKERS, CHARLM_WTACRS
from optimlab.bench.workloads.digits import DIGITS_LOGREG, DIGITS_MLP
from optimlab.bench.workloads.distributed import DIGITS_MLP_BYZANTINE, LSQ_HETERO, MNIST1D_CNN_4WORKERS
from optimlab.bench.workloads.mnist1d_cnn import MNIST1D_CNN, MNIST1D_CNN_TRACT
from optimlab.bench.workloads.modadd import MODADD_GROKKING, MODADD_GROKKING_STABLEMAX
from optimlab.bench.workloads.synthetic import QUADRATIC, ROSENBROCK

__all__ = ["WORKLOADS", "DataParallelTask", "Split", "Task", "Workload", "get_workload"]

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        DIGITS_LOGREG,
        DIGITS_MLP,
        MNIST1D_CNN,
        ROSENBROCK,
        QUADRATIC,
        CHARLM,
        MODADD_GROKKING,
        MODADD_GROKKING_STABLEMAX,
        MNIST1D_CNN_TRACT,
        CHARLM_WTACRS,
        LSQ_HETERO,
        MNIST1D_CNN_4WORKERS,
        DIGITS_MLP_BYZANTINE,
        CHARLM_4WORKERS,
    )
}


def get_workload(name: str) -> Workload:
    """The workload called ``name``; a ``KeyError`` lists the choices."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; choose from: {', '.join(WORKLOADS)}") from None
