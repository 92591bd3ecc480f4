"""Normalized LR+GD and plain LR+GD (Tyurin, arXiv 2412.08424 §6): the paper's two-point golden iterates,
Theorem 6.1's iteration bound, the log-space step against float64 direct evaluation, and the large-step limits
(normalised / unnormalised batch perceptron)."""

from __future__ import annotations

import math

import pytest
import torch

from optimlab.solvers import NormalizedLRGD
from optimlab.solvers.normalized_lrgd import logistic_gradient, logistic_loss, lrgd_direction, margins

F64 = torch.float64
# the paper's Theorem-4.1 data set
A2 = torch.tensor([[1.0, -1.0], [-1.0, -4.0]], dtype=F64)
Y2 = torch.tensor([1.0, -1.0], dtype=F64)


def separable(n: int, d: int, margin: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n Gaussian points at distance >= margin from a random hyperplane through 0, labelled by its side."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(d, generator=gen, dtype=F64)
    normal /= normal.norm()
    points = torch.randn(4 * n, d, generator=gen, dtype=F64)
    points = points[(points @ normal).abs() >= margin][:n]
    assert points.shape[0] == n
    return points, torch.sign(points @ normal)


def zeros(d: int = 2) -> torch.Tensor:
    return torch.zeros(d, dtype=F64)


@pytest.mark.parametrize("gamma", [1.0, 10.0])
def test_first_step_from_zero(gamma: float) -> None:
    normalized, plain = (
        NormalizedLRGD(A2, Y2, step_size=gamma),
        NormalizedLRGD(A2, Y2, step_size=gamma, normalized=False),
    )
    theta, _ = normalized.update(zeros(), normalized.init_state(zeros()))
    torch.testing.assert_close(theta, gamma * torch.tensor([1.0, 1.5], dtype=F64), rtol=1e-15, atol=0)
    theta, _ = plain.update(zeros(), plain.init_state(zeros()))
    torch.testing.assert_close(theta, gamma * torch.tensor([0.5, 0.75], dtype=F64), rtol=1e-15, atol=0)


def test_golden_iterates_gamma_1() -> None:
    theta, state = NormalizedLRGD(A2, Y2, step_size=1.0).run(zeros())
    assert state.iter_num == 2 and state.error.item() == 0
    torch.testing.assert_close(theta, torch.tensor([2.0, 0.50730746], dtype=F64), rtol=0, atol=5e-9)
    torch.testing.assert_close(state.margins, torch.tensor([1.4927, 4.0292], dtype=F64), rtol=0, atol=5e-5)


def test_golden_iterates_gamma_10() -> None:
    theta, state = NormalizedLRGD(A2, Y2, step_size=10.0).run(zeros())
    assert state.iter_num == 2 and state.error.item() == 0
    # the second step is ~ the normalised perceptron step a_1 = (1, -1) of the one misclassified point
    torch.testing.assert_close(theta, torch.tensor([20.0, 5.0], dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.1, 1.0, 10.0, 100.0])
def test_separates_within_theorem_6_1_bound(gamma: float) -> None:
    margin = 0.1
    features, labels = separable(n=60, d=4, margin=margin, seed=3)
    n, radius = features.shape[0], features.norm(dim=1).max().item()
    # the data's max-margin mu >= `margin` (the generating hyperplane attains it), so this bound is >= the theorem's
    bound = radius**2 / margin**2 + 2 * math.log(2 * n - 1) / (gamma * margin**2)
    theta, state = NormalizedLRGD(features, labels, step_size=gamma, max_iter=100_000).run(zeros(4))
    assert state.error.item() == 0 and (margins(features, labels, theta) > 0).all()
    assert 1 <= state.iter_num <= bound


def test_log_space_step_equals_float64_direct_evaluation() -> None:
    features, labels = separable(n=40, d=5, margin=0.0, seed=7)
    theta = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    m = margins(features, labels, theta)
    w = torch.sigmoid(-m)
    direct = (w * labels) @ features / w.sum()
    torch.testing.assert_close(lrgd_direction(features, labels, m, normalized=True), direct, rtol=1e-13, atol=1e-13)
    # and it is the GD step divided by the mean weight: -grad f / mean(w)
    torch.testing.assert_close(direct, -logistic_gradient(features, labels, theta) / w.mean(), rtol=1e-13, atol=1e-13)


def test_log_space_step_stays_finite_where_direct_float32_is_0_over_0() -> None:
    features, labels = separable(n=40, d=5, margin=0.5, seed=8)
    theta = torch.linalg.lstsq(features, labels * 400).solution  # margins around 400 and at least ~150
    m64 = margins(features, labels, theta)
    assert m64.min() > 110  # sigma(-110) = 1.7e-48 underflows in float32
    w64 = torch.sigmoid(-m64)
    reference = (w64 * labels) @ features / w64.sum()

    f32, y32, m32 = features.float(), labels.float(), m64.float()
    w32 = torch.sigmoid(-m32)
    assert w32.sum() == 0 and torch.isnan((w32 * y32) @ f32 / w32.sum()).all()
    log_space = lrgd_direction(f32, y32, m32, normalized=True)
    assert torch.isfinite(log_space).all()
    torch.testing.assert_close(log_space.double(), reference, rtol=1e-4, atol=1e-4)


def test_large_margins_give_the_normalised_perceptron_step() -> None:
    features, labels = separable(n=30, d=4, margin=0.0, seed=9)
    direction = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=F64)
    wrong = margins(features, labels, direction) <= 0
    assert 0 < wrong.sum() < 30
    perceptron = (labels[wrong, None] * features[wrong]).mean(dim=0)
    # scaling theta scales the margins; the soft weights tend to the indicators of the misclassified set
    m = margins(features, labels, 1e4 * direction)
    torch.testing.assert_close(lrgd_direction(features, labels, m, normalized=True), perceptron, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("normalized", [True, False])
def test_large_step_iterates_follow_the_batch_perceptron(normalized: bool) -> None:
    """theta_t / gamma -> the batch perceptron from theta_0 = 0 (Theorem 3.2; normalised version for §6)."""
    features, labels = separable(n=50, d=3, margin=0.05, seed=11)
    n, gamma = features.shape[0], 1e8
    solver = NormalizedLRGD(features, labels, step_size=gamma, normalized=normalized, max_iter=500)
    theta, state = zeros(3), solver.init_state(zeros(3))
    ya = labels[:, None] * features
    hat = ya.mean(dim=0) if normalized else ya.mean(dim=0) / 2
    steps = 0
    while True:
        theta, state = solver.update(theta, state)
        steps += 1
        torch.testing.assert_close(theta / gamma, hat, rtol=1e-6, atol=1e-6)
        wrong = (ya @ hat) <= 0
        if not wrong.any():
            break
        hat = hat + (ya[wrong].mean(dim=0) if normalized else ya[wrong].sum(dim=0) / n)
    assert state.error.item() == 0 and steps >= 2


def test_optimality_fun_is_the_gradient_and_vanishes_at_the_minimiser_of_non_separable_data() -> None:
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(40, 3, generator=gen, dtype=F64)
    labels = torch.where(torch.rand(40, generator=gen) < 0.5, -1.0, 1.0).to(F64)  # random labels: not separable
    solver = NormalizedLRGD(features, labels, step_size=2.0, normalized=False, max_iter=3000)
    theta = torch.randn(3, generator=gen, dtype=F64).requires_grad_(True)
    (autograd,) = torch.autograd.grad(logistic_loss(features, labels, theta), theta)
    torch.testing.assert_close(solver.optimality_fun(theta.detach()), autograd, rtol=1e-13, atol=1e-15)
    theta, state = solver.run(zeros(3))
    assert state.iter_num == 3000 and state.error.item() > 0  # never separates: the budget runs out
    assert solver.optimality_fun(theta).norm() < 1e-10
    # the normalised method has the same stationary point
    theta_n, _ = NormalizedLRGD(features, labels, step_size=0.5, max_iter=3000).run(zeros(3))
    torch.testing.assert_close(theta_n, theta, rtol=1e-8, atol=1e-8)


def test_float32_and_device_follow_the_features() -> None:
    solver = NormalizedLRGD(A2.float(), torch.tensor([1, -1]), step_size=1.0)  # integer labels are converted
    theta, state = solver.run(torch.zeros(2, dtype=F64))
    assert theta.dtype == torch.float32 and state.margins.dtype == torch.float32
    torch.testing.assert_close(theta, torch.tensor([2.0, 0.50730746]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step_size": 0.0}, r"Invalid step_size: 0\.0; expected a number with 0 < step_size"),
        ({"step_size": -1.0}, r"Invalid step_size"),
        ({"normalized": 1}, r"Invalid normalized: 1; expected True or False"),
        ({"max_iter": 10.0}, r"Invalid max_iter"),
        ({"tol": -1}, r"Invalid tol"),
    ],
)
def test_invalid_hyperparameters(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        NormalizedLRGD(A2, Y2, **kwargs)


def test_invalid_data() -> None:
    with pytest.raises(ValueError, match=r"labels must be -1 or \+1.*2 \* y - 1"):
        NormalizedLRGD(A2, torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match=r"labels must be a 1-D tensor of length n = 2"):
        NormalizedLRGD(A2, torch.tensor([1.0, -1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"features must be a 2-D floating tensor"):
        NormalizedLRGD(A2[0], Y2[:1])
    with pytest.raises(ValueError, match=r"features must be a 2-D floating tensor"):
        NormalizedLRGD(A2.long(), Y2)
    with pytest.raises(ValueError, match=r"at least one point"):
        NormalizedLRGD(torch.zeros(0, 2), torch.zeros(0))
    with pytest.raises(ValueError, match=r"the iterate must be a tensor of shape \(d,\) = \(2,\); got \(3,\)"):
        NormalizedLRGD(A2, Y2).run(torch.zeros(3))
