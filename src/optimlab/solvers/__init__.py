"""Iterative solvers on one contract (:mod:`optimlab.solvers.base`): ``init_state``, ``update``, ``run`` and,
where one exists, ``optimality_fun``."""

from optimlab.solvers.base import Solver, SolverState
from optimlab.solvers.normalized_lrgd import LRGDState, NormalizedLRGD

__all__ = ["LRGDState", "NormalizedLRGD", "Solver", "SolverState"]
