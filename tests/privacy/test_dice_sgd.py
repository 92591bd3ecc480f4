"""DiceSGD (the paper's form): the error-buffer identity, the limits (plain SGD; C2 = 0 is DP-SGD-GC), the noise
of the official practice, and the bias it removes on a noise-free problem with a known optimum."""

from __future__ import annotations

import math

import pytest
import torch

from optimlab.privacy import DPSGD, DiceSGD, dicesgd_noise_inflation

from .test_dp_sgd import flat, make_params, random_grads


def row(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def errors(opt, params) -> torch.Tensor:
    return torch.cat([opt.state[p]["error"].reshape(-1) for p in params])


def clip(x: torch.Tensor, c: float) -> torch.Tensor:
    """clip over the last dimension, written independently of the library."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > c, x * c / n, x)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 3.0])
def test_error_buffer_identity_and_update(ratio) -> None:
    """e_{t+1} − e_t = ḡ − v_t, v_t read off the parameters (σ = 0); and e_{t+1} = [e_t − clip(e_t, C2)] +
    (1/B) Σ (g_i − clip(g_i, C1)) from an independent computation."""
    params, lr, C1, B = make_params(), 0.1, 0.3, 8.0
    opt = DiceSGD(params, lr=lr, max_grad_norm=C1, error_clip_ratio=ratio, noise_multiplier=0.0, expected_batch_size=B)
    e = torch.zeros(row(params).numel(), dtype=torch.float64)
    fed_back_clipped = False
    for step in range(8):
        grads = random_grads(6, seed=step)
        before = row(params)
        opt.step(grads)
        v = (before - row(params)) / lr
        g_bar = flat(grads).sum(0) / B
        e_next = errors(opt, params)
        torch.testing.assert_close(e_next - e, g_bar - v, rtol=1e-12, atol=1e-12)
        rows = flat(grads)
        expected = e - clip(e, ratio * C1) + (rows - clip(rows, C1)).sum(0) / B
        torch.testing.assert_close(e_next, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, clip(rows, C1).sum(0) / B + clip(e, ratio * C1), rtol=1e-12, atol=1e-12)
        fed_back_clipped |= bool(e.norm() > ratio * C1)
        e = e_next
    assert fed_back_clipped  # the error clip was active at some step


def test_noise_never_enters_the_error_buffer() -> None:
    a, b = make_params(), make_params()
    opt_a = DiceSGD(a, noise_multiplier=2.0, expected_batch_size=4.0, seed=1)
    opt_b = DiceSGD(b, noise_multiplier=2.0, expected_batch_size=4.0, seed=2)
    for step in range(3):
        grads = random_grads(4, seed=step)
        opt_a.step(grads), opt_b.step(grads)
    assert not torch.equal(row(a), row(b))
    # e depends on the parameters only through the gradients, which are the same here
    torch.testing.assert_close(errors(opt_a, a), errors(opt_b, b), rtol=0, atol=0)


def test_no_noise_and_infinite_thresholds_is_plain_sgd() -> None:
    a, b = make_params(), make_params()
    dice = DiceSGD(a, lr=0.2, max_grad_norm=math.inf, error_clip_ratio=1.0, noise_multiplier=0.0)
    sgd = torch.optim.SGD(b, lr=0.2)
    for step in range(5):
        grads = random_grads(5, seed=step)
        dice.step(grads)
        for p, g in zip(b, grads):
            p.grad = g.mean(0)
        sgd.step()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert not errors(dice, a).any()  # nothing was clipped, nothing to feed back


def test_zero_error_threshold_is_dp_sgd_gc_with_the_same_noise() -> None:
    a, b = make_params(), make_params()
    dice = DiceSGD(a, lr=0.3, max_grad_norm=0.2, error_clip_ratio=0.0, noise_multiplier=1.3, expected_batch_size=5.0)
    dp = DPSGD(b, lr=0.3, max_grad_norm=0.2, noise_multiplier=1.3, expected_batch_size=5.0)
    for step in range(5):
        grads = random_grads(5, seed=step)
        dice.step(grads), dp.step(grads)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert errors(dice, a).norm() > 0  # the buffer fills, but nothing is fed back


@pytest.mark.parametrize("ratio", [0.0, 1.0, 4.0])
def test_noise_std_follows_the_official_inflation(ratio) -> None:
    p = torch.nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    sigma, C1, B = 1.5, 0.4, 2.0
    opt = DiceSGD([p], lr=1.0, max_grad_norm=C1, error_clip_ratio=ratio, noise_multiplier=sigma, expected_batch_size=B)
    opt.step([torch.zeros(3, 200_000, dtype=torch.float64)])  # zero gradients, zero buffer: the noise alone
    std = sigma * C1 * math.sqrt(1 + 2 * ratio) / B
    assert std == pytest.approx(sigma * C1 * dicesgd_noise_inflation(ratio) / B)
    n = p.numel()
    assert abs(p.detach().std().item() - std) < 5 * std / (2 * n) ** 0.5
    assert abs(p.detach().mean().item()) < 5 * std / n**0.5


def test_removes_the_clipping_bias_on_a_heterogeneous_problem() -> None:
    """f(θ) = (1/N) Σ ½(θ − a_i)², per-sample gradients θ − a_i, full batch, no noise, C1 far below the gradients:
    the optimum is mean(a) = 2.25, where every record is still clipped; clipped SGD stops where the clipped gradients
    cancel, at 0. (A much smaller C1 or lr also converges, after a long oscillation while the buffer unwinds.)"""
    a = torch.tensor([-1.0, 0.0, 0.0, 10.0], dtype=torch.float64)
    optimum, C1, lr, steps = a.mean().item(), 0.5, 0.1, 3000

    def run(opt, theta):
        for _ in range(steps):
            opt.step([(theta.detach() - a).unsqueeze(1)])
        return theta.item()

    theta = torch.nn.Parameter(torch.tensor([5.0], dtype=torch.float64))
    dice = run(DiceSGD([theta], lr=lr, max_grad_norm=C1, error_clip_ratio=1.0, noise_multiplier=0.0), theta)
    theta = torch.nn.Parameter(torch.tensor([5.0], dtype=torch.float64))
    clipped = run(DPSGD([theta], lr=lr, max_grad_norm=C1, noise_multiplier=0.0), theta)
    assert dice == pytest.approx(optimum, abs=1e-9)
    assert abs(clipped) < 0.1 and abs(clipped - optimum) > 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"error_clip_ratio": -1.0}, "Invalid error_clip_ratio"),
        ({"error_clip_ratio": math.inf}, "Invalid error_clip_ratio.*noise_multiplier"),
        ({"max_grad_norm": -0.5}, "Invalid max_grad_norm"),
        ({"noise_multiplier": -0.1}, "Invalid noise_multiplier"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DiceSGD(make_params(), **kwargs)
    DiceSGD(make_params(), error_clip_ratio=math.inf, max_grad_norm=math.inf, noise_multiplier=0.0)


def test_missing_per_sample_gradients_raise() -> None:
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="DiceSGD needs per-sample gradients"):
        DiceSGD(params).step()
