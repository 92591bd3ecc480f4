"""Batch-size scaling (arXiv 2006.09092) and the Step Law (arXiv 2503.04715): golden values and errors."""

from __future__ import annotations

import math

import pytest
import torch

import optimlab
from optimlab.schedules import STEP_LAW_COEFFICIENTS, batch_scaling_rule, is_sgd_like, scale_lr_for_batch, step_law

# (N, D) -> (lr, batch tokens), from the spec: the paper's rounded constants and the released tool's means
GOLDEN = {
    "paper": {(1e9, 1e11): (1.6325e-3, 1.108e6), (1e8, 1e10): (4.1577e-3, 2.975e5)},
    "tool": {(1e9, 1e11): (1.6624e-3, 1.1075e6), (1e8, 1e10): (4.2283e-3, 2.9743e5)},
}


@pytest.mark.parametrize("coefficients", ["paper", "tool"])
@pytest.mark.parametrize("point", [(1e9, 1e11), (1e8, 1e10)])
def test_step_law_golden_values(coefficients: str, point: tuple[float, float]) -> None:
    lr, batch = GOLDEN[coefficients][point]
    result = step_law(*point, coefficients=coefficients)
    assert result.lr == pytest.approx(lr, rel=1e-4)
    assert result.batch_tokens == pytest.approx(batch, rel=5e-4)
    assert result.batch_sequences is None


def test_default_is_the_papers_formula() -> None:
    for n, d in [(3e8, 2e10), (1e9, 1e11), (5e10, 2e12)]:
        result = step_law(n, d)
        assert result.lr == pytest.approx(1.79 * n**-0.713 * d**0.307, rel=1e-13)
        assert result.batch_tokens == pytest.approx(0.58 * d**0.571, rel=1e-13)


def test_tool_constants_are_the_papers_to_the_printed_digits() -> None:
    tool = STEP_LAW_COEFFICIENTS["tool"]
    assert round(tool[1], 3) == -0.713 and round(tool[2], 3) == 0.307 and round(tool[4], 3) == 0.571
    assert round(math.exp(tool[3]), 2) == 0.58
    assert math.floor(100 * math.exp(tool[0])) / 100 == 1.79  # 1.7973: the paper's 1.79 is truncated, not rounded


def test_sequences_and_fitted_range() -> None:
    inside = step_law(1e9, 1e11, seq_len=2048)
    assert inside.in_fitted_range and inside.warnings == []
    assert inside.batch_sequences == inside.batch_tokens / 2048
    small_model = step_law(1e8, 1e10)
    assert not small_model.in_fitted_range
    assert len(small_model.warnings) == 1 and "params" in small_model.warnings[0]
    both = step_law(7e9, 1.4e12)
    assert len(both.warnings) == 2 and "tokens" in both.warnings[1]


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((0, 1e10), {}, "Invalid params"),
        ((-1e9, 1e10), {}, "Invalid params"),
        ((1e9, 0), {}, "Invalid tokens"),
        ((1e9, math.nan), {}, "Invalid tokens"),
        ((math.inf, 1e10), {}, "finite"),
        ((1e9, 1e10), {"seq_len": 0}, "Invalid seq_len"),
        ((1e9, 1e10), {"coefficients": "fit"}, "Invalid coefficients"),
    ],
)
def test_step_law_bad_input(args, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        step_law(*args, **kwargs)


def test_batch_scaling_rules() -> None:
    assert scale_lr_for_batch(0.1, 512, 256, "linear") == pytest.approx(0.2, rel=1e-15)
    assert scale_lr_for_batch(1e-3, 256, 64, "sqrt") == pytest.approx(2e-3, rel=1e-15)
    assert scale_lr_for_batch(1e-3, 16, 64, "sqrt") == pytest.approx(5e-4, rel=1e-15)
    for rule in ("linear", "sqrt"):  # scaling there and back is the identity
        there = scale_lr_for_batch(0.3, 1000, 128, rule)
        assert scale_lr_for_batch(there, 128, 1000, rule) == pytest.approx(0.3, rel=1e-14)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.1, 0, 256, "linear"), "Invalid batch_size"),
        ((0.1, 256, -1, "linear"), "Invalid base_batch_size"),
        ((-0.1, 256, 256, "linear"), "Invalid lr"),
        ((0.1, 256, 256, "cubic"), "Invalid rule"),
    ],
)
def test_batch_scaling_bad_input(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scale_lr_for_batch(*args)


def test_rule_for_an_optimizer() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert batch_scaling_rule(sgd) == "linear" and is_sgd_like(sgd)
    assert batch_scaling_rule(optimlab.OrthoGrad(torch.optim.SGD(params, lr=0.1))) == "linear"
    for spec in ("sgd", "torch:SGD@linear", "orthograd(torch:SGD[momentum=0.9])", torch.optim.ASGD):
        assert batch_scaling_rule(spec) == "linear"
    for spec in ("torch:AdamW", "adam", "adan@refined", optimlab.EXAdam, torch.optim.Adagrad(params)):
        assert batch_scaling_rule(spec) == "sqrt" and not is_sgd_like(spec)
    with pytest.raises(ValueError, match="no batch-size scaling rule is known for Lion"):
        batch_scaling_rule("lion")
    with pytest.raises(TypeError):
        batch_scaling_rule(3)
