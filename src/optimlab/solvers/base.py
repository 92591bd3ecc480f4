r"""The solver contract: one interface for every iterative solver in :mod:`optimlab.solvers`.

Optimizers (:mod:`optimlab.optim`) train a model one ``step()`` at a time and own their parameters. A *solver*
instead solves one stated problem (a regression, a bilevel problem, a saddle point, a constrained program) and
is a pure function of its iterate, in the style of JAXopt and TorchOpt:

* ``state = solver.init_state(x0)``: the state that goes with the iterate ``x0``;
* ``x, state = solver.update(x, state)``: one iteration; ``state`` must be the state returned together with
  ``x`` (or ``init_state(x)``), since it may carry quantities already computed at ``x`` (margins, gradients);
  neither argument is modified;
* ``x, state = solver.run(x0, max_iter=..., tol=...)``: ``init_state`` followed by ``update`` until the
  solver's stopping rule holds or ``max_iter`` iterations are done; ``state.iter_num`` reports how many;
* ``solver.optimality_fun(x, *data)``: where the solver has one, the residual :math:`F(x, \text{data})` whose
  zero characterises a solution (a gradient, a fixed-point residual ``T(x) - x``, a KKT system). Implicit
  differentiation of a solution with respect to the data (``custom_root``) needs nothing else from the solver.

**Iterates.** ``x`` is a tensor; a multi-block problem (min-max, bilevel) passes a tuple of tensors. The
contract itself never does arithmetic on ``x``, so any pytree of tensors works; each solver states its own.

**State.** A ``typing.NamedTuple`` of tensors and Python ints, immutable: ``update`` returns a new one. Every
state has ``iter_num`` (an ``int``, the number of updates done) and ``error`` (a 0-dim tensor: what the stopping
rule compares with ``tol``). Why this form:

* checkpointable: ``state._asdict()`` is a dict of tensors and ints, so ``torch.save`` / ``torch.load(...,
  weights_only=True)`` round-trip it and ``StateClass(**d)`` rebuilds it;
* ``torch.compile`` friendly: NamedTuples are pytrees that ``torch.compile`` and ``torch.utils._pytree`` flatten
  natively, and an immutable state has no aliasing to trace;
* no hidden mutation: calling ``update`` twice on the same ``(x, state)`` gives the same result, which is what
  unrolled differentiation and debugging need.

**Stopping.** ``run`` stops when :meth:`Solver.converged` is true, by default ``state.error <= tol``; a solver
defines its ``error`` (and may override ``converged``) and documents the rule. ``run`` reads that decision on
the host once per iteration (a solver's driver loop, not a training step).

**Hyperparameters.** Declared once in the solver's registry entry (``kind="solver"``) as
:class:`~optimlab._core.validation.Constraint` rules and checked by :meth:`Solver.check_hyperparameters`;
a violation is a ``ValueError`` naming the argument and the allowed range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from optimlab._core.validation import check_hyperparameters

if TYPE_CHECKING:
    from optimlab.registry import MethodInfo

__all__ = ["Solver", "SolverState", "MAX_ITER", "TOL"]


class SolverState(Protocol):
    """What every solver state has (each solver's state is a NamedTuple with these fields and its own)."""

    @property
    def iter_num(self) -> int: ...

    @property
    def error(self) -> Tensor: ...


S = TypeVar("S", bound=SolverState)

# ``run``'s iteration budget and tolerance when neither the call nor the solver sets them
MAX_ITER = 1000
TOL = 1e-6


class Solver(Generic[S]):
    """Base class of iterative solvers; see the module docstring for the contract.

    A subclass implements :meth:`init_state` and :meth:`update`, and :meth:`optimality_fun` where a residual
    characterises its solutions. It keeps its ``max_iter`` and ``tol`` (the defaults of :meth:`run`) as
    attributes of those names.
    """

    info: ClassVar[MethodInfo]
    max_iter: int = MAX_ITER
    tol: float = TOL

    def check_hyperparameters(self, **values: Any) -> None:
        """Check ``values`` against the registry entry's rules; ``ValueError`` names the first violation."""
        check_hyperparameters(self.info.hyperparameters, values)

    def init_state(self, x0: Any) -> S:
        """The state that goes with the initial iterate ``x0``."""
        raise NotImplementedError

    def update(self, x: Any, state: S) -> tuple[Any, S]:
        """One iteration from ``(x, state)``; returns the new iterate and its state (the inputs are unchanged)."""
        raise NotImplementedError

    def converged(self, x: Any, state: S, tol: float) -> bool:
        """The stopping rule of :meth:`run`: by default ``state.error <= tol``."""
        return bool(state.error <= tol)

    @torch.no_grad()
    def run(self, x0: Any, *, max_iter: int | None = None, tol: float | None = None) -> tuple[Any, S]:
        """Iterate from ``x0`` until :meth:`converged` or ``max_iter`` updates; returns ``(x, state)``.

        ``max_iter`` and ``tol`` default to the solver's own (``self.max_iter``, ``self.tol``); ``state.iter_num``
        is the number of updates done, so ``state.iter_num == max_iter`` with ``converged`` false means the
        budget ran out. The loop does not build an autograd graph (differentiate a solution implicitly
        through :meth:`optimality_fun`, or unroll ``update`` yourself).
        """
        max_iter = self.max_iter if max_iter is None else max_iter
        tol = self.tol if tol is None else tol
        rules = self.info.hyperparameters
        check_hyperparameters(
            {k: rules[k] for k in ("max_iter", "tol") if k in rules}, {"max_iter": max_iter, "tol": tol}
        )
        x, state = x0, self.init_state(x0)
        while state.iter_num < max_iter and not self.converged(x, state, tol):
            x, state = self.update(x, state)
        return x, state

    def optimality_fun(self, x: Any, *data: Any) -> Any:
        """The residual :math:`F(x, \\text{data})` that is zero exactly at solutions (same structure as ``x``).

        ``data`` are the problem's inputs one may differentiate a solution with respect to; by default the
        solver's own. Solvers without such a residual raise ``NotImplementedError``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no optimality function; differentiate through its iterations instead"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""
