"""AdaHessian (spec §5): the closed form on a separable quadratic, the spatial average, the Hutchinson estimator
against the exact Hessian diagonal, update_each against a direct reference, the create_graph error, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from optimlab import AdaHessian
from optimlab._core.kernels import kernel_mode
from optimlab.optim.adahessian import adahessian_, adahessian_update, hessian_diagonals, rademacher_probes

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only synchronise


def small_cnn(seed: int = 0) -> nn.Module:
    """A 4-D conv kernel, a 3-D one (Conv1d), a matrix and biases; non-separable, float64."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv2d = nn.Conv2d(2, 3, 3)
            self.conv1d = nn.Conv1d(3, 2, 2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.conv2d(x))  # (n, 3, 3, 3)
            h = torch.tanh(self.conv1d(h.mean(dim=3)))  # (n, 2, 2)
            return self.fc(torch.cat([h.flatten(1), h.flatten(1).pow(2)], dim=1))

    return Net().double()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 5, 5, generator=gen, dtype=F64), torch.randint(0, 3, (6,), generator=gen)


def loss_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(data[0]), data[1])


def train(opt: torch.optim.Optimizer, model: nn.Module, steps: int, data=None) -> None:
    data = data or batch()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, data).backward(create_graph=True)
        opt.step()


def exact_hessian(model: nn.Module, data) -> torch.Tensor:
    """The dense Hessian of the loss over all parameters, flattened in ``model.parameters()`` order."""
    names, params = zip(*model.named_parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def loss_flat(flat: torch.Tensor) -> torch.Tensor:
        tensors = {n: x.view(s) for n, x, s in zip(names, flat.split(sizes), shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, tensors, (data[0],)), data[1])

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss_flat, flat)


# -- closed forms ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_first_step_on_a_separable_quadratic_is_the_closed_form(power: float, weight_decay: float) -> None:
    """f = ½ Σ h θ²: Hz = h ⊙ z, so D = |h| whatever the probe, and after one step (m̂ = g, v̂ = h²)
    θ₁ = θ₀ − lr·(hθ₀ / (|h|^k + ε) + λθ₀); negative curvature enters through |h|."""
    h = torch.tensor([4.0, 0.25, -2.0, 9.0, 1.0], dtype=F64)
    theta0 = torch.tensor([1.0, -3.0, 0.5, 2.0, -1.0], dtype=F64)
    x = nn.Parameter(theta0.clone())
    lr, eps = 0.7, 1e-4
    opt = AdaHessian([x], lr=lr, eps=eps, hessian_power=power, weight_decay=weight_decay)
    (0.5 * h * x**2).sum().backward(create_graph=True)
    opt.step()
    expected = theta0 - lr * (h * theta0 / (h.abs() ** power + eps) + weight_decay * theta0)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-15, atol=1e-15)


def test_lr_one_solves_a_positive_separable_quadratic_in_one_step() -> None:
    h = torch.logspace(-1, 3, 7, dtype=F64)
    x = nn.Parameter(torch.linspace(-2, 2, 7, dtype=F64))
    opt = AdaHessian([x], lr=1.0, eps=1e-12)
    (0.5 * h * x**2).sum().backward(create_graph=True)
    opt.step()
    theta0 = torch.linspace(-2, 2, 7, dtype=F64)
    torch.testing.assert_close(x.detach(), theta0 * 1e-12 / (h + 1e-12), rtol=1e-6, atol=1e-15)  # ε's residue


def test_update_each_is_exact_when_the_estimate_does_not_change() -> None:
    """On a separable quadratic D = |h| on every step, so reusing the last D (update_each > 1) must give the
    same trajectory as recomputing it; freezing v between updates (pytorch-optimizer) would not."""
    h = torch.tensor([3.0, 0.5, 8.0], dtype=F64)
    runs = []
    for update_each in (1, 3):
        x = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))
        opt = AdaHessian([x], lr=0.3, update_each=update_each)
        for _ in range(10):
            opt.zero_grad()
            (0.5 * h * (x - 1) ** 2).sum().backward(create_graph=opt.hessian_due)
            opt.step()
        runs.append(x.detach())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.slow
def test_converges_on_rosenbrock_at_its_learning_rate() -> None:
    """The battery's Rosenbrock run (5000 steps, linear decay) at lr 2: above its grid, see the exemption."""
    x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=F64))
    steps = 5000
    opt = AdaHessian([x], lr=2.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        ((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2).backward(create_graph=True)
        opt.step()
        decay.step()
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=F64), rtol=0, atol=1e-2)


# -- the estimate ----------------------------------------------------------------------------------------------
def test_first_step_agrees_with_a_dense_reference() -> None:
    """v after one step is (1 − β2)·D², with D from the exact Hessian times the optimizer's own probe (drawn again
    from a generator with the same seed): the HVP, the absolute value and the spatial averages, end to end."""
    model, data = small_cnn(), batch()
    beta2 = 0.99
    opt = AdaHessian(model.parameters(), betas=(0.9, beta2), seed=7)
    loss_of(model, data).backward(create_graph=True)
    params = list(model.parameters())
    hess = exact_hessian(model, data)
    opt.step()

    probes = rademacher_probes([p.grad for p in params], torch.Generator().manual_seed(7))
    hz = hess @ torch.cat([z.reshape(-1) for z in probes])
    for p, hz_p in zip(params, hz.split([p.numel() for p in params])):
        d = hz_p.view(p.shape).abs()
        if p.dim() >= 3:  # v is kept once per kernel
            d = d.mean(dim=tuple(range(2, p.dim())), keepdim=True)
        torch.testing.assert_close(opt.state[p]["exp_hessian_diag_sq"], (1 - beta2) * d**2, rtol=1e-12, atol=1e-15)


def test_spatial_average_is_constant_over_each_kernel() -> None:
    model = small_cnn()
    for spatial_average in (True, False):
        opt = AdaHessian(model.parameters(), spatial_average=spatial_average)
        train(opt, model, 1)
        for name, p in model.named_parameters():
            v = opt.state[p]["exp_hessian_diag_sq"]
            if p.dim() >= 3:
                spread = v.flatten(2).amax(dim=2) - v.flatten(2).amin(dim=2)  # per (out, in) kernel
                assert (spread == 0).all() if spatial_average else (spread > 0).any(), name
            elif p.dim() == 2:  # matrices are never averaged
                assert (v != v[:, :1]).any(), name


def test_hutchinson_estimate_is_unbiased() -> None:
    """z ⊙ Hz, from the optimizer's own probes and Hessian-vector products, has mean diag H and, for Rademacher z,
    variance Σ_{j≠i} H_ij² per coordinate. The mean of N = 300 estimates (lr 0: the point stays put; update_each 2
    keeps each Hz in the state) is within 5 standard errors of the exact diagonal at every coordinate; the official
    |Hz| estimator is not (it is biased upwards by the off-diagonal curvature)."""
    model, data = small_cnn(), batch()
    params = list(model.parameters())
    hess = exact_hessian(model, data)
    diag = hess.diagonal()
    std_error = ((hess**2).sum(dim=1) - diag**2).sqrt() / math.sqrt(300)
    for absolute in (False, True):
        opt = AdaHessian(params, lr=0.0, update_each=2, spatial_average=False, seed=2)
        replay = torch.Generator().manual_seed(2)  # the optimizer's probes, drawn again
        total = torch.zeros_like(diag)
        for _ in range(300):
            opt.zero_grad()
            loss_of(model, data).backward(create_graph=True)
            opt.step()  # a Hessian step; the next one reuses it
            z = torch.cat([z.reshape(-1) for z in rademacher_probes([p.grad for p in params], replay)])
            hz = torch.cat([opt.state[p]["hessian_diag"].reshape(-1) for p in params])  # unaveraged: Hz itself
            total += (z * hz).abs() if absolute else z * hz
            opt.step()
        deviation = ((total / 300 - diag) / std_error).abs()
        if absolute:
            assert deviation.max() > 10
        else:
            assert deviation.max() < 5, deviation.max()


def test_hessian_diagonals_options() -> None:
    hz = torch.tensor([[[[-1.0, 3.0], [2.0, -6.0]]]], dtype=F64)  # one 2x2 kernel
    z = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]], dtype=F64)
    (d,) = hessian_diagonals([hz], [z])
    assert d.shape == (1, 1, 1, 1) and d.item() == 3.0  # mean |hz|
    (d,) = hessian_diagonals([hz], [z], abs_before_avg=False)
    assert d.item() == -2.0  # mean z * hz
    for absolute in (True, False):  # unaveraged: hz itself, whose square is |hz|² = (z * hz)²
        (d,) = hessian_diagonals([hz], [z], abs_before_avg=absolute, spatial_average=False)
        assert torch.equal(d**2, (hz * z) ** 2)
    (d,) = hessian_diagonals([hz[0, 0]], [z[0, 0]], dtypes=[torch.float32])
    assert d.dtype == torch.float32 and torch.equal(d, hz[0, 0].float())  # matrices are never averaged
    assert hz[0, 0, 0, 0] == -1.0  # inputs are not overwritten


def test_probes_come_from_the_optimizer_generator() -> None:
    """The global RNG is untouched; a seed reproduces a run and another seed changes it."""
    runs = []
    for seed in (3, 3, 4):
        model = small_cnn()
        opt = AdaHessian(model.parameters(), seed=seed)
        before = torch.get_rng_state()
        train(opt, model, 3)
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    probes = rademacher_probes([torch.zeros(4000, dtype=torch.float32)], torch.Generator().manual_seed(0))[0]
    assert set(probes.unique().tolist()) == {-1.0, 1.0} and abs(probes.mean().item()) < 0.1


def test_probe_entries_are_fair_and_independent_at_every_bit_position() -> None:
    """31 entries come from one random word: each of the 31 positions is fair (mean 0), neighbours and positions a
    word apart are uncorrelated, and the dtype/shape follow each tensor. Bounds: 5 standard errors."""
    bits, words = 31, 40_000
    (z,) = rademacher_probes([torch.zeros(words, bits)], torch.Generator().manual_seed(11))  # a row per word
    bound = 5 / math.sqrt(words)
    assert z.abs().eq(1).all()
    assert z.mean(0).abs().max() < bound  # every bit position fair
    assert (z[:, :-1] * z[:, 1:]).mean(0).abs().max() < bound  # neighbours within a word
    assert (z[:-1] * z[1:]).mean(0).abs().max() < bound  # the same position in consecutive words
    probes = rademacher_probes(
        [torch.zeros(3, 5, dtype=torch.float64), torch.zeros(7, dtype=torch.bfloat16)], torch.Generator().manual_seed(0)
    )
    assert [(p.shape, p.dtype) for p in probes] == [((3, 5), torch.float64), ((7,), torch.bfloat16)]
    assert all(p.abs().eq(1).all() for p in probes)
    # the stream itself: entry k is +1 where bit k % 31 of word k // 31 is set (a resumed run, or a result saved by
    # an earlier version, draws the same probes)
    drawn = torch.empty(3, dtype=torch.int32).random_(generator=torch.Generator().manual_seed(5))
    expected = [1.0 if (int(drawn[k // 31]) >> (k % 31)) & 1 else -1.0 for k in range(70)]
    (z,) = rademacher_probes([torch.zeros(70)], torch.Generator().manual_seed(5))
    assert z.tolist() == expected


# -- update_each ----------------------------------------------------------------------------------------------
def reference_run(model: nn.Module, steps: int, *, update_each: int, lr: float, betas, eps: float, seed: int):
    """AdaHessian written out directly (per tensor, float64): the probe drawn only on every update_each-th step,
    the last D reused in between."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    d = [None] * len(params)
    beta1, beta2 = betas
    data = batch()
    for t in range(1, steps + 1):
        grads = torch.autograd.grad(loss_of(model, data), params, create_graph=True)
        if (t - 1) % update_each == 0:
            probes = rademacher_probes(list(grads), gen)
            hzs = torch.autograd.grad(grads, params, grad_outputs=probes)
            d = [
                hz.abs().mean(dim=tuple(range(2, hz.dim())), keepdim=True) if hz.dim() >= 3 else hz.abs() for hz in hzs
            ]
        with torch.no_grad():
            for p, g, m_p, v_p, d_p in zip(params, grads, m, v, d):
                m_p.mul_(beta1).add_((1 - beta1) * g)
                v_p.mul_(beta2).add_((1 - beta2) * d_p**2)
                denom = v_p.sqrt() / math.sqrt(1 - beta2**t) + eps
                p -= lr * (m_p / (1 - beta1**t)) / denom
    return [p.detach().clone() for p in params]


def test_update_each_matches_a_direct_reference() -> None:
    kw = dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3)
    model = small_cnn()
    opt = AdaHessian(model.parameters(), update_each=3, seed=5, **kw)
    due = []
    data = batch()
    for _ in range(7):
        due.append(opt.hessian_due)
        opt.zero_grad()
        loss_of(model, data).backward(create_graph=opt.hessian_due)  # plain backward on the other steps
        opt.step()
    assert due == [True, False, False, True, False, False, True]
    expected = reference_run(small_cnn(), 7, update_each=3, seed=5, **kw)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_a_new_parameter_forces_a_hessian_step() -> None:
    a, b = nn.Parameter(torch.ones(3, dtype=F64)), nn.Parameter(torch.ones(2, dtype=F64))
    opt = AdaHessian([a, b], update_each=5)
    for step in range(3):
        opt.zero_grad()
        loss = (a**4).sum() + ((b**4).sum() if step == 2 else 0)
        loss.backward(create_graph=step in (0, 2))
        opt.step()
    assert "hessian_diag" in opt.state[b] and opt.state[b]["step"] == 1


def test_hessian_due_covers_a_parameter_that_first_gets_a_gradient_later() -> None:
    """The documented loop, ``backward(create_graph=opt.hessian_due)``, with a parameter whose first gradient comes
    on an off-schedule step: that step must compute its D, so hessian_due says so (a frozen parameter, which never
    gets a gradient, does not keep every step due)."""
    a, b = nn.Parameter(torch.ones(3, dtype=F64)), nn.Parameter(torch.full((2,), 2.0, dtype=F64))
    frozen = nn.Parameter(torch.ones(4, dtype=F64), requires_grad=False)
    opt = AdaHessian([a, b, frozen], lr=0.1, update_each=4)
    due = []
    for step in range(9):
        due.append(opt.hessian_due)
        before = b.detach().clone()
        opt.zero_grad()
        loss = (a**4).sum() + ((b**4).sum() if step >= 1 else 0)
        loss.backward(create_graph=opt.hessian_due)
        opt.step()
    assert due == [True, True, False, False, True, False, False, False, True]
    assert opt.state[b]["step"] == 8 and "hessian_diag" in opt.state[b] and frozen not in opt.state
    # the last step was due: on a separable quartic |Hz| = 12 b² exactly, at b's value before that step (an
    # unaveraged D is kept as Hz, its sign left out: the update uses D² only)
    torch.testing.assert_close(opt.state[b]["hessian_diag"].abs(), 12 * before**2, rtol=1e-15, atol=0)


def test_missing_create_graph_for_a_new_parameter_names_it() -> None:
    a, b = nn.Parameter(torch.ones(3, dtype=F64)), nn.Parameter(torch.ones(2, dtype=F64))
    opt = AdaHessian([a, b], update_each=4)
    (a**4).sum().backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    ((a**4).sum() + (b**4).sum()).backward()
    with pytest.raises(
        RuntimeError, match=r"parameter 1 of param group 0 \(shape \(2,\)\) has no Hessian estimate yet"
    ):
        opt.step()
    assert opt.state[b]["step"] == 0 and opt.hessian_due


# -- errors ----------------------------------------------------------------------------------------------------
def test_missing_create_graph_is_a_clear_error_and_changes_nothing() -> None:
    model = small_cnn()
    opt = AdaHessian(model.parameters())
    train(opt, model, 1)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    opt.zero_grad()
    loss_of(model, batch()).backward()
    with pytest.raises(RuntimeError, match=r"loss\.backward\(create_graph=True\)"):
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert all(
        torch.equal(opt.state[p]["exp_avg"], state[id(p)]) and opt.state[p]["step"] == 1 for p in model.parameters()
    )
    assert opt.hessian_due  # the failed step did not count


def test_grad_scaler_is_refused() -> None:
    model = small_cnn()
    opt = AdaHessian(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, batch())).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_invalid_arguments() -> None:
    params = [nn.Parameter(torch.ones(2))]
    with pytest.raises(
        ValueError, match=r"Invalid hessian_power: 1\.5; expected a number with 0 <= hessian_power <= 1"
    ):
        AdaHessian(params, hessian_power=1.5)
    with pytest.raises(ValueError, match=r"Invalid update_each: 0"):
        AdaHessian(params, update_each=0)
    with pytest.raises(ValueError, match=r"Invalid update_each: 2 in a param group; expected 1"):
        AdaHessian([{"params": params}, {"params": [nn.Parameter(torch.ones(1))], "update_each": 2}])


# -- state and gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("update_each", [1, 2])
def test_resume_continues_bit_identically(update_each: int) -> None:
    model = small_cnn()
    opt = AdaHessian(model.parameters(), update_each=update_each, lr=0.05)
    train(opt, model, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_model = small_cnn(seed=9)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = AdaHessian(resumed_model.parameters(), update_each=update_each, seed=123)  # the checkpoint wins
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.hessian_due == opt.hessian_due
    train(opt, model, 4)
    train(resumed, resumed_model, 4)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_step_leaves_the_gradient_and_its_graph_alone() -> None:
    model = small_cnn()
    opt = AdaHessian(model.parameters())
    loss_of(model, batch()).backward(create_graph=True)
    grads = [p.grad for p in model.parameters()]
    copies = [g.detach().clone() for g in grads]
    opt.step()
    assert all(
        p.grad is g and torch.equal(g, c) and g.grad_fn is not None
        for p, g, c in zip(model.parameters(), grads, copies)
    )


def test_param_groups_take_their_own_options() -> None:
    model = small_cnn()
    conv, rest = [model.conv2d.weight], [p for n, p in model.named_parameters() if n != "conv2d.weight"]
    opt = AdaHessian([{"params": conv, "spatial_average": False}, {"params": rest, "lr": 0.01}])
    train(opt, model, 1)
    v = opt.state[model.conv2d.weight]["exp_hessian_diag_sq"].flatten(2)
    assert (v.amax(dim=2) > v.amin(dim=2)).any()  # not averaged in its group
    v = opt.state[model.conv1d.weight]["exp_hessian_diag_sq"].flatten(2)
    assert (v.amax(dim=2) == v.amin(dim=2)).all()


@pytest.mark.parametrize("power, weight_decay", [(1.0, 0.0), (0.5, 0.1)])
def test_multi_tensor_path_is_the_kernel_bit_for_bit(power: float, weight_decay: float) -> None:
    """The eager path runs the kernel's operations with torch._foreach_* over all tensors: the same rounding as the
    kernel's own function applied tensor by tensor (a spatially averaged D and v included)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (7,), (5, 6)]
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    diags = [torch.rand(4, 3, 1, 1, generator=gen, dtype=F64), torch.randn(7, generator=gen, dtype=F64)]
    diags.append(torch.randn(5, 6, generator=gen, dtype=F64))
    kw = dict(lr=0.2, betas=(0.8, 0.95), eps=1e-3, weight_decay=weight_decay, hessian_power=power)
    ours = [p.clone() for p in params]
    states = [
        {"step": 2, "exp_avg": torch.rand_like(p), "exp_hessian_diag_sq": torch.rand_like(d)}
        for p, d in zip(params, diags)
    ]
    reference = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in states]
    with kernel_mode("eager"):
        adahessian_(ours, grads, states, hessian_diags=diags, **kw)
    for p, g, d, s in zip(params, grads, diags, reference):
        s["step"] += 1
        scale = (1 - 0.95 ** s["step"]) ** (power / 2)
        scalars = (1 - 0.8, 1 - 0.95, 1e-3 * scale, 1 - 0.2 * weight_decay, 0.2 * scale / (1 - 0.8 ** s["step"]))
        adahessian_update.fn(p, g, d, s["exp_avg"], s["exp_hessian_diag_sq"], scalars, power=power)
    for p, q, s, r in zip(ours, params, states, reference):
        assert torch.equal(p, q) and torch.equal(s["exp_avg"], r["exp_avg"])
        assert torch.equal(s["exp_hessian_diag_sq"], r["exp_hessian_diag_sq"])


def test_gradient_wrappers_refuse_it() -> None:
    """A wrapper steps its inner optimizer on transformed gradients, which have no graph to differentiate."""
    from optimlab import OrthoGrad

    with pytest.raises(TypeError, match="cannot be wrapped"):
        OrthoGrad(AdaHessian([nn.Parameter(torch.ones(2))]))
