"""The conformance battery: every registered optimizer and wrapper, every check, no per-method code.

A check a method cannot pass is an exemption in its registry entry (``MethodInfo.exemptions``) with the reason.
Where the method refuses the case (``compile``: a step that cannot be traced; ``grad_scaler``: gradients scaled
outside autograd), the battery asserts that it raises the documented error instead of passing silently; where the
check's premise does not hold for the method (``param_groups``, ``missing_gradients``: one state shared by all
parameters; ``convergence``), it is skipped with the reason, and the method's own tests check what holds instead.
For a method that differentiates the gradient again (``needs_create_graph``), every backward pass keeps its graph
(``problems.backward``, ``problems.set_gradients``).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from optimlab._core.kernels import kernel_mode

from .problems import (
    SeparableQuadratic,
    attach_per_sample,
    backward,
    clone_params,
    make_params,
    rosenbrock,
    set_gradients,
    train,
)
from .subjects import CLOSURE_ENTRIES, SUBJECTS, Subject

subjects = pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.id)


def exempt_or_run(subject: Subject, check: str, body) -> None:
    """Run the check; for an exempt subject, assert that it raises the documented error instead."""
    reason = subject.exempt(check)
    if reason is None:
        body()
    else:
        with pytest.raises((TypeError, RuntimeError)):
            body()


def skip_if_exempt(subject: Subject, check: str) -> None:
    """For checks whose premise a method does not share (``MethodInfo.exemptions``), skip with the reason."""
    reason = subject.exempt(check)
    if reason is not None:
        pytest.skip(f"exempt in the registry: {reason}")


def assert_same(xs, ys) -> None:
    for x, y in zip(xs, ys, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


@subjects
def test_param_groups_equal_separate_optimizers(subject: Subject) -> None:
    skip_if_exempt(subject, "param_groups")
    problem = SeparableQuadratic()
    params = make_params()
    grouped = subject.make([{"params": params[:2]}, {"params": params[2:], "lr": subject.lr / 3}])
    train(grouped, params, problem, 6)

    alone = make_params()
    first, second = subject.make(alone[:2]), subject.make(alone[2:], lr=subject.lr / 3)
    for _ in range(6):
        first.zero_grad(), second.zero_grad()
        backward(problem.loss(alone), first)
        first.step(), second.step()
    assert_same(params, alone)


@subjects
def test_zero_grad_set_to_none_false_has_no_aliasing(subject: Subject) -> None:
    problem = SeparableQuadratic()
    a, b = make_params(), make_params()
    opt_a, opt_b = subject.make(a), subject.make(b)
    train(opt_a, a, problem, 5)
    train(opt_b, b, problem, 5, set_to_none=False)
    assert_same(a, b)
    opt_a.zero_grad()
    assert all(p.grad is None for p in a)
    opt_b.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in b)


@subjects
def test_closure_returns_loss_and_matches_manual_backward(subject: Subject) -> None:
    problem = SeparableQuadratic()
    a, b = make_params(), make_params()
    opt_a, opt_b = subject.make(a), subject.make(b)
    for _ in range(4):
        expected = problem.loss(a).detach()
        loss = opt_a.step(problem.closure(opt_a, a))
        assert torch.equal(loss.detach(), expected)
    train(opt_b, b, problem, 4)
    assert_same(a, b)


@subjects
def test_missing_gradients_keep_per_parameter_steps(subject: Subject) -> None:
    """A parameter without a gradient for its first steps behaves as if the optimizer started when it got one."""
    skip_if_exempt(subject, "missing_gradients")
    problem, late = SeparableQuadratic(), 3
    params = make_params()
    opt = subject.make(params)
    train(opt, params, problem, 7, skip=lambda step, i: i == 1 and step < late)

    ref = make_params()
    early = [ref[0], ref[2]]
    opt_early, opt_late = subject.make(early), subject.make([ref[1]])
    for step in range(7):
        for o in (opt_early, opt_late):
            o.zero_grad()
        loss = problem.loss([ref[0], ref[1].detach() if step < late else ref[1], ref[2]])
        backward(loss, opt_early)
        opt_early.step()
        if step >= late:
            opt_late.step()
    torch.testing.assert_close(params, ref, rtol=1e-13, atol=1e-13)


@subjects
def test_state_dict_round_trip_continues_bit_identically(subject: Subject) -> None:
    problem = SeparableQuadratic()
    params = make_params()
    opt = subject.make(params)
    train(opt, params, problem, 4)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_params = clone_params(params)
    resumed = subject.make(resumed_params, lr=subject.lr * 7)  # the checkpoint's hyperparameters win
    resumed.load_state_dict(loaded)

    train(opt, params, problem, 4)
    train(resumed, resumed_params, problem, 4)
    assert_same(params, resumed_params)


@subjects
def test_lr_scheduler_drives_the_learning_rate(subject: Subject) -> None:
    problem = SeparableQuadratic()
    a, b = make_params(), make_params()
    opt_a = subject.make(a)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda epoch: 0.5)
    opt_b = subject.make(b, lr=subject.lr * 0.5)
    for _ in range(4):
        train(opt_a, a, problem, 1)
        scheduler.step()
        train(opt_b, b, problem, 1)
    assert_same(a, b)

    frozen = make_params()
    opt_frozen = subject.make(frozen)
    torch.optim.lr_scheduler.LambdaLR(opt_frozen, lambda epoch: 0.0)
    train(opt_frozen, frozen, problem, 3)
    assert_same(frozen, make_params())


@subjects
def test_tensor_learning_rate(subject: Subject) -> None:
    problem = SeparableQuadratic()
    a, b = make_params(), make_params()
    train(subject.make(a), a, problem, 4)
    train(subject.make(b, lr=torch.tensor(subject.lr, dtype=torch.float64)), b, problem, 4)
    assert_same(a, b)


@subjects
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 4e-2)], ids=["float32", "bfloat16"])
def test_low_precision_tracks_float64(subject: Subject, dtype: torch.dtype, tol: float) -> None:
    problem = SeparableQuadratic()
    ref, low = make_params(), make_params(dtype=dtype)
    train(subject.make(ref), ref, problem, 5)
    opt = subject.make(low)
    train(opt, low, problem, 5)
    for p, r in zip(low, ref):
        assert p.dtype == dtype
        if subject.exempt("low_precision") is None:  # else the state-dtype policy below still holds
            torch.testing.assert_close(p.double(), r, rtol=tol, atol=tol)
    if subject.inner is None:  # a wrapped optimizer keeps its own state policy
        for p in low:
            for value in opt.state[p].values():
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                    assert value.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


# layouts the compiled path views flat (contiguous, transposed, channels-last) and ones it leaves to the eager
# path (one element, a strided slice)
PATH_SHAPES = ((6, 5), (40,), (1,), (3, 4, 5, 2), (7, 9))


def _layouts(dtype: torch.dtype) -> list[torch.Tensor]:
    contiguous, vector, single, conv, wide = make_params(PATH_SHAPES, dtype=dtype)
    transposed = torch.nn.Parameter(contiguous.detach().t().contiguous().t())  # (6, 5) with column-major strides
    channels_last = torch.nn.Parameter(conv.detach().contiguous(memory_format=torch.channels_last))
    sliced = torch.nn.Parameter(wide.detach()[:, ::2])  # not dense: eager
    return [contiguous, vector, single, transposed, channels_last, sliced]


@subjects
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)], ids=["float64", "float32"])
def test_all_implementation_paths_agree(subject: Subject, dtype: torch.dtype, tol: float) -> None:
    """The compiled kernels against the eager reference: 8 steps on the same gradients; params and state agree
    to ``tol`` (relative and absolute), the rounding differences of a fused loop (FMA, reassociated sums)."""
    runs = {}
    for mode in ("eager", "compiled"):
        params = _layouts(dtype)
        gen = torch.Generator().manual_seed(3)
        with kernel_mode(mode, min_numel=2):  # every dense tensor of 2+ elements through the compiled kernels
            opt = subject.make(params)
            for _ in range(8):
                grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in params]
                set_gradients(opt, params, grads)
                opt.step()
        states = [v for p in params for v in opt.state[p].values() if torch.is_tensor(v) and v.dim() > 0]
        runs[mode] = [p.detach() for p in params] + states
    for compiled, eager in zip(runs["compiled"], runs["eager"], strict=True):
        assert compiled.stride() == eager.stride()
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)


@subjects
def test_grad_scaler_step_and_skip(subject: Subject) -> None:
    problem = SeparableQuadratic()
    a, b = make_params(), make_params()
    opt_a, opt_b = subject.make(a), subject.make(b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def run():
        for _ in range(4):
            opt_a.zero_grad()
            backward(scaler.scale(problem.loss(a)), opt_a)
            scaler.step(opt_a)
            scaler.update()
        train(opt_b, b, problem, 4)
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)

        before = [p.detach().clone() for p in a]
        opt_a.zero_grad()
        backward(scaler.scale(problem.loss(a)), opt_a)
        a[0].grad[0, 0] = math.inf
        scaler.step(opt_a)
        assert_same(a, before)

    exempt_or_run(subject, "grad_scaler", run)


@subjects
def test_zero_size_and_zero_dim_parameters(subject: Subject) -> None:
    params = [
        torch.nn.Parameter(torch.empty(0, 3, dtype=torch.float64)),
        torch.nn.Parameter(torch.tensor(1.5).double()),
    ]
    opt = subject.make(params)
    for _ in range(3):
        opt.zero_grad()
        backward(params[0].sum() + (params[1] - 4.0) ** 2, opt)
        opt.step()
    assert params[0].shape == (0, 3)
    assert params[1].shape == () and math.isfinite(params[1].item())
    if subject.inner is None:  # (a wrapper may legitimately cancel a 0-dim gradient, as ⊥Grad does)
        assert params[1].item() != 1.5


@subjects
def test_step_leaves_gradients_untouched(subject: Subject) -> None:
    problem = SeparableQuadratic()
    params = make_params()
    opt = subject.make(params)
    for _ in range(3):
        opt.zero_grad()
        backward(problem.loss(params), opt)
        grads = [p.grad for p in params]
        copies = [g.clone() for g in grads]
        opt.step()
        assert all(p.grad is g for p, g in zip(params, grads))
        assert_same(grads, copies)


@subjects
def test_sparse_gradients(subject: Subject) -> None:
    params = make_params()
    opt = subject.make(params)
    for p in params:
        p.grad = torch.ones_like(p).to_sparse()
    attach_per_sample(opt, params)
    if subject.info.capabilities.sparse_grads:
        opt.step()
    else:
        with pytest.raises(TypeError, match="sparse"):
            opt.step()


@subjects
def test_complex_parameters(subject: Subject) -> None:
    params = [torch.nn.Parameter(torch.randn(3, dtype=torch.complex128))]
    opt = subject.make(params)
    params[0].grad = torch.ones_like(params[0])
    attach_per_sample(opt, params)
    if subject.info.capabilities.complex_params:
        opt.step()
    else:
        with pytest.raises(TypeError, match="complex"):
            opt.step()


@subjects
def test_non_finite_gradient_propagates(subject: Subject) -> None:
    """Documented policy: no hidden check; a NaN gradient reaches the parameters (use GradScaler to skip)."""
    problem = SeparableQuadratic()
    params = make_params()
    opt = subject.make(params)
    train(opt, params, problem, 2)
    opt.zero_grad()
    backward(problem.loss(params), opt)
    params[0].grad[1, 1] = math.nan
    opt.step()
    assert not torch.isfinite(params[0]).all()
    if not subject.info.capabilities.global_state:  # only methods that couple tensors may spread it
        assert all(torch.isfinite(p).all() for p in params[1:])


def _final_loss(subject: Subject, x0: torch.Tensor, loss_fn, steps: int, lr: float) -> float:
    """Train from ``x0`` with linear decay to zero; weight decay is off, since it moves the optimum."""
    x = torch.nn.Parameter(x0.clone())
    opt = subject.make([x], lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        backward(loss_fn(x), opt)
        opt.step()
        decay.step()
    value = loss_fn(x).item()
    return value if math.isfinite(value) else math.inf


def _check_convergence(subject: Subject, x0: torch.Tensor, loss_fn, steps: int, target: float) -> None:
    """Some learning rate of one broad grid (the same for every method) reaches ``target``."""
    reason = subject.exempt("convergence")
    if reason is not None:
        pytest.skip(f"exempt in the registry: {reason}")
    results = {}
    for lr in (1e-2, 3e-2, 3e-3, 1e-1, 1e-3, 3e-1, 1.0, 1e-4):
        results[lr] = _final_loss(subject, x0, loss_fn, steps, lr)
        if results[lr] < target:
            return
    pytest.fail(f"no learning rate reached {target:.3g}; final losses by lr: {results}")


@subjects
def test_converges_on_an_ill_conditioned_quadratic(subject: Subject) -> None:
    curvature = torch.logspace(0, 2, 10, dtype=torch.float64)  # condition number 100
    optimum = torch.linspace(-1, 1, 10, dtype=torch.float64)

    def loss(x):
        return 0.5 * (curvature * (x - optimum) ** 2).sum()

    x0 = optimum.flip(0) * 1.5
    _check_convergence(subject, x0, loss, 600, 1e-4 * loss(x0).item())


@subjects
def test_converges_on_rosenbrock(subject: Subject) -> None:
    _check_convergence(subject, torch.tensor([-1.2, 1.0], dtype=torch.float64), rosenbrock, 5000, 1e-3)


@pytest.mark.slow
@subjects
def test_compiled_training_step(subject: Subject) -> None:
    problem = SeparableQuadratic()
    a, b = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    opt_a, opt_b = subject.make(a), subject.make(b)

    def step(opt, params):
        opt.zero_grad()
        backward(problem.loss(params), opt)
        opt.step()

    compiled = torch.compile(step)

    def run():
        for _ in range(3):
            compiled(opt_a, a)
            step(opt_b, b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    exempt_or_run(subject, "compile", run)


@pytest.mark.parametrize("info", CLOSURE_ENTRIES, ids=lambda i: i.name)
def test_step_without_the_required_closure_says_so(info) -> None:
    params = make_params()
    opt = info.cls(params)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises((RuntimeError, TypeError), match="closure"):
        opt.step()
    assert_same(params, make_params())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
