"""Lion-𝒦: the constraint each κ induces with weight decay λ (arXiv 2310.05898), as invariants and fixed points."""

from __future__ import annotations

import pytest
import torch

from optimlab import Lion, LionK

LAMBDA, LR = 0.5, 0.1  # lr·λ ≤ 1, the condition under which the constraint set is invariant
P, Q = 3.0, 1.5  # dual exponents for κ = ℓp


def spectral(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x.reshape(x.shape[0], -1), ord=2)


CONSTRAINT = {  # the norm that κ's decay bounds by 1/λ
    "sign": lambda x: x.abs().max(),
    "huber": lambda x: x.abs().max(),
    "l2": lambda x: torch.linalg.vector_norm(x),
    "lp": lambda x: torch.linalg.vector_norm(x, ord=Q),
    "nuclear": spectral,
}


@pytest.mark.parametrize("kappa", sorted(CONSTRAINT))
def test_constraint_set_is_invariant(kappa: str) -> None:
    gen = torch.Generator().manual_seed(0)
    norm = CONSTRAINT[kappa]
    start = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    theta = torch.nn.Parameter(start / norm(start) / LAMBDA * 0.999)  # just inside the set
    opt = LionK([theta], lr=LR, weight_decay=LAMBDA, kappa=kappa, norm_p=P, huber_delta=0.3)
    for _ in range(300):
        theta.grad = -theta.detach().sign() * torch.rand(6, 4, generator=gen, dtype=torch.float64)  # push outward
        opt.step()
        assert norm(theta) <= 1 / LAMBDA * (1 + 1e-12)
    assert norm(theta) > 0.9 / LAMBDA  # the outward push keeps it near the boundary: the bound is tight


def test_sign_excess_outside_the_box_contracts() -> None:
    theta = torch.nn.Parameter(torch.full((5,), 10.0, dtype=torch.float64))
    opt = Lion([theta], lr=LR, weight_decay=LAMBDA)
    excess = (theta.abs() - 1 / LAMBDA).clamp_min(0).max()
    for _ in range(20):
        theta.grad = -torch.ones(5, dtype=torch.float64)  # pushes outward
        opt.step()
        new_excess = (theta.abs() - 1 / LAMBDA).clamp_min(0).max()
        assert new_excess <= (1 - LR * LAMBDA) * excess + 1e-12
        excess = new_excess


def _solve(kappa: str, target: torch.Tensor, steps: int = 4000, **kw) -> torch.Tensor:
    """Minimise ½‖θ − target‖² with LionK, decaying lr linearly to 0 to settle on the fixed point."""
    theta = torch.nn.Parameter(torch.zeros_like(target))
    opt = LionK([theta], lr=0.02, weight_decay=LAMBDA, kappa=kappa, **kw)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        theta.grad = theta.detach() - target
        opt.step()
        decay.step()
    return theta.detach()


def test_fixed_points_solve_the_constrained_problems() -> None:
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 3
    r = 1 / LAMBDA
    # κ = sign: projection onto the box
    torch.testing.assert_close(_solve("sign", b), b.clamp(-r, r), atol=2e-2, rtol=0)
    # κ = ℓ2: projection onto the ball
    torch.testing.assert_close(_solve("l2", b), b * min(1.0, r / b.norm().item()), atol=2e-2, rtol=0)
    # κ = Huber(δ): box plus (λδ/2)‖θ‖², so the interior solution is b/(1 + λδ), clipped to the box
    delta = 0.4
    expected = (b / (1 + LAMBDA * delta)).clamp(-r, r)
    torch.testing.assert_close(_solve("huber", b, huber_delta=delta), expected, atol=2e-2, rtol=0)
    # κ = quadratic: plain L2, the ridge solution b/(1 + λ)
    torch.testing.assert_close(_solve("quadratic", b), b / (1 + LAMBDA), atol=1e-6, rtol=0)
    # κ = nuclear: singular values clipped at 1/λ (projection onto the spectral-norm ball)
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    torch.testing.assert_close(_solve("nuclear", b), u @ torch.diag(s.clamp(max=r)) @ vh, atol=2e-2, rtol=0)


def test_kappa_sign_is_lion_bitwise() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(7, 5, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    lion, lionk = Lion([a], lr=1e-2, weight_decay=0.3), LionK([b], lr=1e-2, weight_decay=0.3, kappa="sign")
    for _ in range(50):
        g = torch.randn(7, 5, generator=gen)
        a.grad, b.grad = g, g.clone()
        lion.step(), lionk.step()
    assert torch.equal(a, b)


def test_nan_momentum_does_not_freeze_silently() -> None:
    theta = torch.nn.Parameter(torch.ones(3))
    opt = Lion([theta], lr=0.1)
    theta.grad = torch.tensor([float("nan"), 1.0, 1.0])
    opt.step()
    assert theta[0].isnan() and theta[1:].isfinite().all()


@pytest.mark.parametrize("kappa", ["l2", "lp", "huber", "nuclear", "quadratic", "sign"])
def test_zero_momentum_gives_a_zero_step(kappa: str) -> None:
    theta = torch.nn.Parameter(torch.ones(4, 3))
    opt = LionK([theta], lr=0.1, kappa=kappa, norm_p=3.0)
    theta.grad = torch.zeros(4, 3)
    opt.step()
    assert torch.equal(theta.detach(), torch.ones(4, 3))


def test_lion_refuses_lionk_options_in_its_groups() -> None:
    for key, value in (("kappa", "l2"), ("norm_p", 3.0), ("huber_delta", 0.5)):
        with pytest.raises(ValueError, match=f"Invalid {key}.*use LionK"):
            Lion([{"params": [torch.nn.Parameter(torch.ones(2))], key: value}])
