"""The solver contract (optimlab.solvers.base): run = init_state + update until the stopping rule, states are
immutable checkpointable NamedTuples, hyperparameters are validated from the registry."""

from __future__ import annotations

import io
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import optimlab
from optimlab._core.validation import Interval
from optimlab.registry import MethodInfo
from optimlab.solvers import NormalizedLRGD, Solver


class HalvingState(NamedTuple):
    iter_num: int
    error: Tensor


class Halving(Solver[HalvingState]):
    """x <- x / 2: the smallest solver; the error is |x|, the fixed point 0, the residual T(x) - x = -x / 2."""

    def __init__(self, *, max_iter: int = 50, tol: float = 1e-3) -> None:
        self.check_hyperparameters(max_iter=max_iter, tol=tol)
        self.max_iter, self.tol = max_iter, tol

    def init_state(self, x0: Tensor) -> HalvingState:
        return HalvingState(0, x0.abs().max())

    def update(self, x: Tensor, state: HalvingState) -> tuple[Tensor, HalvingState]:
        x = x / 2
        return x, HalvingState(state.iter_num + 1, x.abs().max())

    def optimality_fun(self, x: Tensor) -> Tensor:
        return x / 2 - x


# a throwaway registry entry, not registered globally (the registry is shared by the whole test session)
Halving.info = MethodInfo(
    name="halving",
    cls=Halving,
    kind="solver",
    paper="-",
    arxiv="0000.00000",
    summary="test solver",
    hyperparameters={"max_iter": Interval(0, integer=True), "tol": Interval(0.0)},
)


def test_run_is_init_state_then_update_until_the_stopping_rule() -> None:
    solver = Halving()
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x, state = solver.run(x0)
    # 2 / 2^k <= 1e-3 first at k = 11
    assert state.iter_num == 11
    torch.testing.assert_close(x, x0 / 2**11, rtol=0, atol=0)
    assert torch.equal(state.error, x.abs().max())
    x_manual, s = x0, solver.init_state(x0)
    for _ in range(11):
        x_manual, s = solver.update(x_manual, s)
    assert torch.equal(x_manual, x) and s == state


def test_run_reports_the_budget_and_call_arguments_override_the_solver() -> None:
    x0 = torch.tensor([1.0], dtype=torch.float64)
    x, state = Halving().run(x0, max_iter=3)
    assert state.iter_num == 3 and x.item() == 1 / 8
    _, state = Halving().run(x0, tol=0.3)  # 1/4 <= 0.3
    assert state.iter_num == 2
    _, state = Halving().run(x0, max_iter=0)
    assert state.iter_num == 0
    _, state = Halving().run(torch.zeros(1))  # a solution already: no update
    assert state.iter_num == 0


def test_update_does_not_modify_its_inputs_and_is_repeatable() -> None:
    solver = NormalizedLRGD(torch.tensor([[1.0, -1.0], [-1.0, -4.0]]), torch.tensor([1.0, -1.0]))
    x = torch.tensor([0.3, -0.2])
    state = solver.init_state(x)
    x_copy, margins_copy = x.clone(), state.margins.clone()
    first = solver.update(x, state)
    second = solver.update(x, state)
    assert torch.equal(x, x_copy) and torch.equal(state.margins, margins_copy)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1].margins, second[1].margins)


def test_state_round_trips_through_a_safe_checkpoint() -> None:
    solver = NormalizedLRGD(torch.randn(6, 3, dtype=torch.float64), torch.tensor([1.0, -1, 1, -1, 1, 1]))
    x, state = solver.run(torch.zeros(3, dtype=torch.float64), max_iter=2)
    buffer = io.BytesIO()
    torch.save({"x": x, "state": state._asdict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = type(state)(**loaded["state"])
    assert restored.iter_num == state.iter_num
    a, b = solver.update(x, state), solver.update(loaded["x"], restored)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].margins, b[1].margins)


def test_bad_run_arguments_and_missing_optimality_function() -> None:
    with pytest.raises(ValueError, match=r"Invalid max_iter: -1; expected an integer"):
        Halving().run(torch.ones(1), max_iter=-1)
    with pytest.raises(ValueError, match=r"Invalid tol: -0\.5"):
        Halving().run(torch.ones(1), tol=-0.5)
    with pytest.raises(ValueError, match=r"Invalid max_iter: 2\.5"):
        Halving(max_iter=2.5)

    class NoResidual(Halving):
        optimality_fun = Solver.optimality_fun

    with pytest.raises(NotImplementedError, match="NoResidual has no optimality function"):
        NoResidual().optimality_fun(torch.ones(1))


def test_optimality_fun_vanishes_at_the_fixed_point() -> None:
    assert torch.equal(Halving().optimality_fun(torch.zeros(3)), torch.zeros(3))


def test_solvers_are_registered_as_solvers_and_not_built_by_create() -> None:
    assert "normalized_lrgd" in optimlab.available("solver")
    info = optimlab.get("normalized_lrgd")
    assert info.cls is NormalizedLRGD and info.defaults["step_size"] == 1.0
    with pytest.raises(TypeError, match="is a solver, not an optimizer"):
        optimlab.create("normalized_lrgd", [torch.nn.Parameter(torch.zeros(1))])
