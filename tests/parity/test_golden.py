"""The spec's golden values and closed forms (spec §1 Adan, §3 diffGrad, §4 Lion), in float64.

EXAdam's golden first step lives in test_exadam.py.
"""

import math
from itertools import pairwise

import pytest
import torch

import optimlab

from .conftest import Problem, bitwise_equal, trajectory

F64 = {"dtype": torch.float64}
EPS = 1e-8
# Coordinates from 1e-7 (where |g| + eps differs from |g| by 10%) to 3: eps placement and signs both show.
G = torch.tensor([0.5, -0.3, 3.0, -1e-3, 1e-7, -2e-7], **F64)


def steps(opt_cls, theta0, grads, **kw):
    """θ after each step of ``opt_cls`` from ``theta0`` fed ``grads``; also returns the optimizer."""
    p = theta0.clone().requires_grad_(True)
    opt = opt_cls([p], **kw)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt


# --------------------------------------------------------------------------------------------- Adan (§1)
def adan_step1(theta, g, lr, wd, no_prox=False):
    """Step 1 (Δ = 0, den = |g| + ε): the update direction is g/(|g| + ε)."""
    u = g / (g.abs() + EPS)
    return (1 - lr * wd) * theta - lr * u if no_prox else (theta - lr * u) / (1 + lr * wd)


def test_adan_two_step_golden():
    (th1, th2), _ = steps(
        optimlab.Adan,
        torch.tensor([1.0], **F64),
        [torch.tensor([g], **F64) for g in (0.5, -0.3)],
        lr=0.1,
        weight_decay=0.5,
    )
    # The spec's θ1 = 0.857142857 leaves the ε out of |g| + ε; with ε = 1e-8 it is 0.857142859 (1.9e-9 higher).
    assert th1.item() == pytest.approx((1 - 0.1 * 0.5 / (0.5 + EPS)) / 1.05, abs=1e-15)
    assert th1.item() == pytest.approx(0.857142859, abs=1e-9)
    assert th2.item() == pytest.approx(0.84992090, abs=1e-8)  # spec, fp64
    # and step 2 written out from the spec's update (code-convention betas, Δ1 = 0 so v1 = 0)
    b1, b2, b3 = 0.98, 0.92, 0.99
    g1, g2 = 0.5, -0.3
    d = g2 - g1
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = (1 - b2) * d
    n = b3 * (1 - b3) * g1**2 + (1 - b3) * (g2 + b2 * d) ** 2
    u = (m / (1 - b1**2) + b2 * v / (1 - b2**2)) / (math.sqrt(n / (1 - b3**2)) + EPS)
    assert th2.item() == pytest.approx((th1.item() - 0.1 * u) / 1.05, abs=1e-14)


@pytest.mark.parametrize("no_prox", [False, True])
def test_adan_step1_closed_form(no_prox):
    theta0 = torch.linspace(-1, 1, G.numel(), **F64)
    (th1,), _ = steps(optimlab.Adan, theta0, [G], lr=0.1, weight_decay=0.5, no_prox=no_prox)
    torch.testing.assert_close(th1, adan_step1(theta0, G, 0.1, 0.5, no_prox), rtol=1e-14, atol=1e-15)


def test_adan_prox_equals_no_prox_without_decay():
    make = lambda no_prox: lambda ps: optimlab.Adan(ps, lr=1e-2, no_prox=no_prox)
    assert bitwise_equal(trajectory(make(False))[0], trajectory(make(True))[0])


def test_adan_restart_reproduces_step1():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(G.numel(), generator=gen, **F64) for _ in range(7)]
    thetas, opt = steps(optimlab.Adan, torch.ones_like(G), grads, lr=0.1, weight_decay=0.5)
    opt.restart()
    p = opt.param_groups[0]["params"][0]
    p.grad = G.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), adan_step1(thetas[-1], G, 0.1, 0.5), rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------------------ diffGrad (§3)
def test_diffgrad_constant_gradient_halves_old_adam_step():
    lr, (b1, b2) = 1e-3, (0.9, 0.999)
    thetas, _ = steps(optimlab.DiffGrad, torch.zeros_like(G), [G] * 10, lr=lr)
    for t in range(1, 11):
        # old-Adam eps form with m_t = (1-β1^t) g, v_t = (1-β2^t) g²
        m, v = (1 - b1**t) * G, (1 - b2**t) * G**2
        old_adam = lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + EPS)
        xi = torch.sigmoid(G.abs()) if t == 1 else 0.5  # g_prev = 0 at step 1, then Δg = 0
        moved = thetas[t - 1] - (thetas[t - 2] if t > 1 else 0.0)
        torch.testing.assert_close(moved, -xi * old_adam, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- Lion (§4)
LR, WD = 1e-2, 0.5


def test_lion_step1():
    theta0, g = torch.linspace(-1, 1, 7, **F64), torch.tensor([0.3, -2.0, 0.0, 1e-12, -1e-12, 5.0, -0.1], **F64)
    (th1,), _ = steps(optimlab.Lion, theta0, [g], lr=LR, weight_decay=WD)
    assert torch.equal(th1, (1 - LR * WD) * theta0 - LR * torch.sign(g))  # sign(0) = 0: that coordinate only decays


def test_lion_moves_exactly_lr_relative_to_decayed_theta():
    # every 4th gradient coordinate is 0 on every step, so c = 0 there; elsewhere c != 0
    problem = Problem(zero_every=4)
    thetas, _ = trajectory(lambda ps: optimlab.Lion(ps, lr=LR, weight_decay=WD), problem, steps=20)
    flat = [torch.cat([p.reshape(-1) for p in th]) for th in [[p.detach() for p in problem.init()]] + thetas]
    expected = LR * problem.keep  # α where c != 0, 0 where c = 0
    for old, new in pairwise(flat):
        # the subtraction below rounds by at most an ulp of θ (|θ| <= 3 here)
        torch.testing.assert_close((new - (1 - LR * WD) * old).abs(), expected, rtol=0, atol=1e-15)
