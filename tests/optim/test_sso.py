"""SSO (Lavington et al., ICML 2023): one plain inner step is SGD, the Armijo inner loop never increases the
surrogate, a linear model's inner minimiser is the least-squares projection of the target step, and the
optimizer contract (closure errors, p.grad untouched, checkpoints, schedulers, param groups, bfloat16)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from optimlab import SSO
from optimlab.optim.sso import armijo_step_, sso_surrogate

F64 = torch.float64


def batch(n: int = 32, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = (x @ torch.randn(d, 1, generator=gen, dtype=F64) + 0.3 * torch.randn(n, 1, generator=gen, dtype=F64) > 0).to(
        F64
    )
    return x, y


def mlp(seed: int = 0, d: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def bce_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: (model(x), lambda out: F.binary_cross_entropy_with_logits(out, y, reduction="sum"))


def test_surrogate_is_zero_at_the_outer_iterate_with_the_loss_gradient_there() -> None:
    x, y = batch()
    model = mlp()
    z = model(x)
    grad_z = 2 * torch.sigmoid(z.detach()) - y  # any G
    value = sso_surrogate(z, z.detach(), grad_z, eta=0.7)
    assert value.item() == 0.0
    params = list(model.parameters())
    surrogate_grads = torch.autograd.grad(value, params, retain_graph=True)
    direct = torch.autograd.grad(z, params, grad_outputs=grad_z * (2 * 0.7 / z.numel()))
    for a, b in zip(surrogate_grads, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_surrogate_is_mse_to_the_target_step_up_to_a_constant() -> None:
    gen = torch.Generator().manual_seed(1)
    f, z, g = (torch.randn(5, 3, generator=gen, dtype=F64) for _ in range(3))
    eta = 0.4
    shifted = ((f - (z - eta * g)) ** 2).mean() - eta**2 * (g**2).mean()
    torch.testing.assert_close(sso_surrogate(f, z, g, eta=eta), shifted, rtol=1e-13, atol=1e-14)


def test_one_plain_inner_step_is_sgd() -> None:
    """inner_steps=1 with a first trial the Armijo test accepts: theta - alpha (2 eta / N) grad L, i.e. SGD."""
    x, y = batch()
    eta, alpha = 0.8, 0.05
    sso_model, sgd_model = mlp(), mlp()
    opt = SSO(sso_model.parameters(), lr=eta, inner_steps=1, inner_lr=alpha, expansion=1.0)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=alpha * 2 * eta / y.numel())
    for _ in range(5):
        loss = opt.step(bce_closure(sso_model, x, y))
        sgd.zero_grad()
        sgd_loss = F.binary_cross_entropy_with_logits(sgd_model(x), y, reduction="sum")
        sgd_loss.backward()
        sgd.step()
        torch.testing.assert_close(loss, sgd_loss.detach(), rtol=1e-13, atol=0)
    for a, b in zip(sso_model.parameters(), sgd_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _surrogate_after(inner_steps: int) -> float:
    """s_t after ``inner_steps`` inner steps of one outer step from the same start (inner_lr large: backtracks)."""
    x, y = batch(seed=2)
    model = mlp(seed=2)
    z = model(x).detach()
    grad_z = torch.sigmoid(z) - y  # the gradient of summed BCE-with-logits
    SSO(model.parameters(), lr=2.0, inner_steps=inner_steps, inner_lr=50.0).step(bce_closure(model, x, y))
    with torch.no_grad():
        return sso_surrogate(model(x), z, grad_z, eta=2.0).item()


def test_armijo_inner_loop_never_increases_the_surrogate() -> None:
    values = [0.0] + [_surrogate_after(m) for m in (1, 2, 3, 5, 8)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:])), values
    assert values[-1] < values[1] < 0


def test_armijo_step_keeps_the_first_step_that_decreases_enough_and_restores_when_none_does() -> None:
    curvature = torch.tensor([1.0, 10.0], dtype=F64)
    p = torch.tensor([1.0, 1.0], dtype=F64)

    def phi() -> torch.Tensor:
        return 0.5 * (curvature * p**2).sum()

    value, grad = phi(), curvature * p
    step, accepted = armijo_step_([p], [grad], value, phi, step_size=1.0, c=0.1, backtrack=0.5)
    # 1, 0.5 and 0.25 overshoot along the stiff axis; 0.125 is the first that passes
    assert accepted and step == 0.125
    torch.testing.assert_close(p, torch.tensor([1 - 0.125, 1 - 1.25], dtype=F64), rtol=0, atol=0)

    start = p.clone()
    step, accepted = armijo_step_(
        [p], [grad], phi(), lambda: torch.tensor(float("inf")), step_size=1.0, c=0.1, backtrack=0.5
    )
    assert not accepted and step < 1e-6 and torch.equal(p, start)


def test_linear_model_inner_minimiser_is_the_least_squares_projection_of_the_target_step() -> None:
    x, y = batch(n=40, d=3, seed=4)
    theta = torch.nn.Parameter(torch.randn(3, 1, generator=torch.Generator().manual_seed(5), dtype=F64))
    eta = 3.0
    z = (x @ theta).detach()
    grad_z = torch.sigmoid(z) - y
    opt = SSO([theta], lr=eta, inner_steps=300, inner_lr=1.0)
    opt.step(lambda: (x @ theta, lambda out: F.binary_cross_entropy_with_logits(out, y, reduction="sum")))
    projection = torch.linalg.lstsq(x, z - eta * grad_z).solution
    # the inner loop stops at a surrogate gradient norm of 1e-6; the surrogate's Hessian 2 X^T X / N is >= ~1 here
    torch.testing.assert_close(theta.detach(), projection, rtol=0, atol=2e-6)


def test_squared_error_with_eta_one_over_l_solves_least_squares_in_one_outer_step() -> None:
    """L(z) = ||z - y||^2 is 2-smooth; eta = 1/2 puts the target step on y, so the inner minimiser is
    argmin ||X theta - y||^2."""
    x, y = batch(n=40, d=3, seed=6)
    theta = torch.nn.Parameter(torch.zeros(3, 1, dtype=F64))
    opt = SSO([theta], lr=0.5, inner_steps=300)
    opt.step(lambda: (x @ theta, lambda out: ((out - y) ** 2).sum()))
    torch.testing.assert_close(theta.detach(), torch.linalg.lstsq(x, y).solution, rtol=0, atol=2e-6)


def test_step_leaves_gradients_alone_and_returns_the_loss_before_the_step() -> None:
    x, y = batch()
    model = mlp()
    grads = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    expected = F.binary_cross_entropy_with_logits(model(x), y, reduction="sum").detach()
    loss = SSO(model.parameters()).step(bce_closure(model, x, y))
    assert torch.equal(loss, expected) and not loss.requires_grad
    for p, g in zip(model.parameters(), grads):
        assert p.grad is g and torch.equal(g, torch.full_like(p, 3.0))


def test_state_dict_round_trip_continues_bit_identically() -> None:
    x, y = batch()
    model = mlp()
    opt = SSO(model.parameters(), lr=1.5, inner_steps=3)
    for _ in range(3):
        opt.step(bce_closure(model, x, y))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = SSO(resumed_model.parameters(), lr=99.0)  # the checkpoint's hyperparameters win
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["lr"] == 1.5 and resumed.param_groups[0]["inner_steps"] == 3
    for _ in range(3):
        opt.step(bce_closure(model, x, y))
        resumed.step(bce_closure(resumed_model, x, y))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"] == resumed.state_dict()["state"]


def test_lr_scheduler_drives_eta_and_eta_zero_does_not_move() -> None:
    x, y = batch()
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = SSO(model.parameters(), lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    opt.step(bce_closure(model, x, y))  # target = z_t: theta_t already minimises the surrogate
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))

    halved, direct = mlp(), mlp()
    opt_a, opt_b = SSO(halved.parameters(), lr=2.0), SSO(direct.parameters(), lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(opt_a, lambda epoch: 0.5)
    opt_a.step(bce_closure(halved, x, y))
    opt_b.step(bce_closure(direct, x, y))
    assert all(torch.equal(a, b) for a, b in zip(halved.parameters(), direct.parameters()))


def test_param_groups_select_parameters_and_must_share_hyperparameters() -> None:
    x, y = batch()
    model = mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    frozen = [p.detach().clone() for p in second]
    SSO([{"params": first}]).step(bce_closure(model, x, y))  # only the first layer moves
    assert all(torch.equal(p, f) for p, f in zip(second, frozen))
    with pytest.raises(ValueError, match="Invalid lr: 0.1 in a param group; expected 1.0"):
        SSO([{"params": first}, {"params": second, "lr": 0.1}])
    SSO([{"params": first, "lr": 0.1}, {"params": second, "lr": 0.1}]).step(bce_closure(model, x, y))  # agreeing groups
    opt = SSO([{"params": first}, {"params": second}])
    opt.param_groups[1]["inner_steps"] = 2
    with pytest.raises(RuntimeError, match="inner_steps differs between param groups"):
        opt.step(bce_closure(model, x, y))


def test_bfloat16_parameters_train() -> None:
    x, y = batch()
    model = mlp().to(torch.bfloat16)
    xb, yb = x.bfloat16(), y.bfloat16()
    opt = SSO(model.parameters(), lr=1.0)
    losses = [opt.step(bce_closure(model, xb, yb)).float().item() for _ in range(8)]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]


def test_trains_a_classifier() -> None:
    x, y = batch(n=64, seed=8)
    model = mlp(seed=8)
    opt = SSO(model.parameters(), lr=1.0)
    losses = [opt.step(bce_closure(model, x, y)).item() for _ in range(40)]
    assert losses[-1] < 0.4 * losses[0]


def test_clear_errors() -> None:
    x, y = batch()
    model = mlp()
    opt = SSO(model.parameters())
    with pytest.raises(RuntimeError, match=r"SSO needs a closure: opt.step\(closure\)"):
        opt.step()
    with pytest.raises(TypeError, match=r"must return \(outputs, loss_fn\)"):
        opt.step(lambda: F.mse_loss(model(x), y))
    with pytest.raises(RuntimeError, match="outputs do not depend on the parameters"):
        opt.step(lambda: (model(x).detach(), lambda out: out.sum()))
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        opt.step(lambda: (model(x), lambda out: out))
    with pytest.raises(ValueError, match=r"Invalid inner_steps: 0; expected an integer with 1 <= inner_steps"):
        SSO(model.parameters(), inner_steps=0)
    with pytest.raises(ValueError, match=r"Invalid c: 1\.0"):
        SSO(model.parameters(), c=1.0)
    complex_param = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(TypeError, match="complex"):
        SSO([complex_param]).step(lambda: (complex_param.real * 1.0, lambda out: out.sum()))


def test_a_gradient_wrapper_refuses_to_wrap_sso() -> None:
    import optimlab

    with pytest.raises(TypeError, match="nothing to wrap"):
        optimlab.CoordClip(SSO(mlp().parameters()))
