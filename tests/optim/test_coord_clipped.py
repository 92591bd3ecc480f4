"""The paper-faithful clipped optimizers of Pan & Li (arXiv 2306.00204) against a direct float64 re-implementation
of the official updates, against their unclipped counterparts at fraction 0, and on a quadratic."""

from __future__ import annotations

import io

import pytest
import torch

import optimlab
from optimlab import CoordClippedAdam, CoordClippedLion, CoordClippedSGD, CoordClippedSignSGD, Lion
from optimlab._core.kernels import kernel_mode
from optimlab.optim.coord_clipped import coord_clipped_adam_direction, lion_interpolation

from ..transforms.test_coord_clip import reference_threshold

SHAPES = ((6, 4), (9,), (), (2, 3, 5))
GROUPS = ({"lr": 0.05, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0.0})  # tensors 0-1, then 2-3
STEPS = 6


def make_params(dtype=torch.float64, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def gradient_sequence(seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(s, generator=gen, dtype=torch.float64)
            * torch.rand(s, generator=gen, dtype=torch.float64) ** -1.5
            for s in SHAPES
        ]
        for _ in range(STEPS)
    ]


def grouped(params, **shared):
    return [{"params": params[:2], **GROUPS[0]}, {"params": params[2:], **GROUPS[1]}], shared


def hyper(i: int) -> dict:
    return GROUPS[0] if i < 2 else GROUPS[1]


def run(cls, steps=None, dtype=torch.float64, **kwargs) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = make_params(dtype)
    groups, shared = grouped(params, **kwargs)
    opt = cls(groups, **shared)
    for grads in steps or gradient_sequence():
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
    return [p.detach() for p in params], opt


# -- the official updates, written out directly (float64, a full sort for the threshold) -------------------------------
def ref_clip(tensors: list[torch.Tensor], fraction: float, scale: float = 1.0) -> list[torch.Tensor]:
    if fraction == 0:
        return list(tensors)
    bound = reference_threshold(tensors, fraction) * scale
    return [torch.where(t.abs() < bound, t, t.sign() * bound) for t in tensors]


def ref_sgd(fraction, momentum, sign=False, scale=1.0) -> list[torch.Tensor]:
    theta = [p.detach().clone() for p in make_params()]
    m = [None] * len(theta)
    for grads in gradient_sequence():
        clipped = ref_clip(grads, fraction, scale)
        for i, (x, c) in enumerate(zip(theta, clipped)):
            g = c + hyper(i)["weight_decay"] * x  # L2 after the clip (sgd_clip.py)
            m[i] = g if m[i] is None else momentum * m[i] + (1 - momentum) * g
            x -= hyper(i)["lr"] * (m[i].sign() if sign else m[i])
    return theta


def ref_adam(fraction, clip_update, betas=(0.9, 0.999), eps=1e-8, scale=1.0) -> list[torch.Tensor]:
    theta = [p.detach().clone() for p in make_params()]
    m = [torch.zeros_like(x) for x in theta]
    v = [torch.zeros_like(x) for x in theta]
    for t, grads in enumerate(gradient_sequence(), start=1):
        decayed = [g + hyper(i)["weight_decay"] * x for i, (g, x) in enumerate(zip(grads, theta))]  # L2 before
        clipped = ref_clip(decayed, fraction, scale)
        updates = []
        for i, (g, c) in enumerate(zip(decayed, clipped)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * c
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g**2  # the unclipped gradient
            updates.append((m[i] / (1 - betas[0] ** t)) / ((v[i] / (1 - betas[1] ** t)).sqrt() + eps))
        for i, (x, u) in enumerate(zip(theta, ref_clip(updates, clip_update))):
            x -= hyper(i)["lr"] * u
    return theta


def ref_lion(fraction, clip_update, betas=(0.9, 0.99), scale=1.0) -> list[torch.Tensor]:
    theta = [p.detach().clone() for p in make_params()]
    m = [torch.zeros_like(x) for x in theta]
    for grads in gradient_sequence():
        clipped = ref_clip(grads, fraction, scale)
        mixes = [betas[0] * m[i] + (1 - betas[0]) * c for i, c in enumerate(clipped)]
        m = [betas[1] * m[i] + (1 - betas[1]) * c for i, c in enumerate(clipped)]
        directions = [k.sign() for k in mixes] if clip_update == 1 else ref_clip(mixes, clip_update)
        for i, (x, d) in enumerate(zip(theta, directions)):
            x.mul_(1 - hyper(i)["lr"] * hyper(i)["weight_decay"]).sub_(hyper(i)["lr"] * d)
    return theta


def assert_close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fraction, momentum, scale", [(0.1, 0.9, 1.0), (0.5, 0.0, 1.0), (0.3, 0.8, 0.5)])
def test_sgd_matches_the_official_update(fraction, momentum, scale) -> None:
    actual, _ = run(CoordClippedSGD, fraction=fraction, momentum=momentum, threshold_scale=scale)
    assert_close(actual, ref_sgd(fraction, momentum, scale=scale))


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_sign_sgd_matches_the_official_update(fraction) -> None:
    actual, _ = run(CoordClippedSignSGD, fraction=fraction, momentum=0.9)
    assert_close(actual, ref_sgd(fraction, 0.9, sign=True))


@pytest.mark.parametrize(
    "fraction, clip_update, scale", [(0.5, 0.0, 1.0), (0.5, 0.5, 1.0), (0.0, 0.5, 1.0), (0.2, 0.1, 2.0)]
)
def test_adam_matches_the_official_update(fraction, clip_update, scale) -> None:
    actual, _ = run(CoordClippedAdam, fraction=fraction, clip_update=clip_update, threshold_scale=scale)
    assert_close(actual, ref_adam(fraction, clip_update, scale=scale))


def test_adam_second_moment_sees_the_unclipped_gradient() -> None:
    first = gradient_sequence()[:1]  # one step, from the same parameters: the same L2-decayed gradient
    _, opt = run(CoordClippedAdam, steps=first, fraction=0.9)
    _, plain = run(torch.optim.Adam, steps=first, foreach=False)
    for p, q in zip(opt.param_groups[0]["params"], plain.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], plain.state[q]["exp_avg_sq"], rtol=1e-14, atol=0)
        assert not torch.allclose(opt.state[p]["exp_avg"], plain.state[q]["exp_avg"])


@pytest.mark.parametrize("fraction, clip_update", [(0.5, 1.0), (0.1, 0.5), (0.0, 0.5), (0.3, 0.0)])
def test_lion_matches_the_official_update(fraction, clip_update) -> None:
    actual, _ = run(CoordClippedLion, fraction=fraction, clip_update=clip_update)
    assert_close(actual, ref_lion(fraction, clip_update))


# -- fraction 0: the unclipped methods ------------------------------------------------------------------------------
def test_unclipped_sgd_is_torch_sgd_with_dampening_equal_to_momentum() -> None:
    ours, _ = run(CoordClippedSGD, momentum=0.9, fraction=0.0)
    theirs, _ = run(torch.optim.SGD, momentum=0.9, dampening=0.9, foreach=False)
    assert all(map(torch.equal, ours, theirs))


def test_unclipped_adam_is_torch_adam() -> None:
    # both put ε outside the bias-corrected root; torch forms m with lerp, so the last bits may differ
    ours, _ = run(CoordClippedAdam, fraction=0.0)
    theirs, _ = run(torch.optim.Adam, foreach=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)


def test_unclipped_lion_is_lion() -> None:
    ours, _ = run(CoordClippedLion, fraction=0.0)
    theirs, _ = run(Lion)
    assert all(map(torch.equal, ours, theirs))


# -- contracts with the clip on, in every combination (the conformance battery runs the defaults) ---------------------
CLIPPED = [
    (CoordClippedSGD, {"fraction": 0.1}),
    (CoordClippedSignSGD, {"fraction": 0.1}),
    (CoordClippedAdam, {"fraction": 0.5, "clip_update": 0.5}),
    (CoordClippedLion, {"fraction": 0.5}),
    (CoordClippedLion, {"fraction": 0.5, "clip_update": 0.5}),
]
clipped_configs = pytest.mark.parametrize("cls, kwargs", CLIPPED, ids=lambda x: getattr(x, "__name__", str(x)))


@clipped_configs
def test_state_dict_round_trip_continues_bit_identically(cls, kwargs) -> None:
    steps = gradient_sequence()
    params = make_params()
    groups, shared = grouped(params, **kwargs)
    opt = cls(groups, **shared)

    def train(o, ps, sequence):
        for grads in sequence:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()

    train(opt, params, steps[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups, shared = grouped(resumed_params, **kwargs)
    resumed = cls(groups, **shared)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(opt, params, steps[3:])
    train(resumed, resumed_params, steps[3:])
    assert all(map(torch.equal, params, resumed_params))


@clipped_configs
def test_step_leaves_gradients_untouched_and_bfloat16_tracks_float64(cls, kwargs) -> None:
    params = make_params()
    groups, shared = grouped(params, **kwargs)
    opt = cls(groups, **shared)
    grads = [g.clone() for g in gradient_sequence()[0]]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert all(p.grad is g for p, g in zip(params, grads))
    assert all(map(torch.equal, grads, gradient_sequence()[0]))

    # the same run on bfloat16 parameters: float32 state, close to the float64 run
    low, _ = run(cls, steps=gradient_sequence()[:3], dtype=torch.bfloat16, **kwargs)
    ref, low_opt = run(cls, steps=gradient_sequence()[:3], **kwargs)
    for a, b in zip(low, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "cls, kwargs, kernel",
    [
        (CoordClippedAdam, {"fraction": 0.5, "clip_update": 0.5}, coord_clipped_adam_direction),
        (CoordClippedLion, {"fraction": 0.5, "clip_update": 0.5}, lion_interpolation),
    ],
    ids=["adam_update_clip", "lion_update_clip"],
)
def test_compiled_kernels_agree_with_eager(cls, kwargs, kernel) -> None:
    """The update-clip paths, which the battery's default configurations do not reach."""
    runs = {}
    for mode in ("eager", "compiled"):
        calls = kernel.compiled_calls
        with kernel_mode(mode, min_numel=2):
            params, opt = run(cls, **kwargs)
        assert (kernel.compiled_calls > calls) == (mode == "compiled" and kernel.failed is None)
        runs[mode] = params + [v for p in opt.state for v in opt.state[p].values() if torch.is_tensor(v)]
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-11, atol=1e-11)


def test_global_options_cannot_differ_between_groups() -> None:
    params = make_params()
    with pytest.raises(ValueError, match=r"Invalid fraction: 0.2 in a param group; expected 0.1"):
        CoordClippedSGD([{"params": params[:2]}, {"params": params[2:], "fraction": 0.2}], fraction=0.1)
    opt = CoordClippedAdam([{"params": params[:2]}, {"params": params[2:]}], fraction=0.5)
    opt.param_groups[1]["clip_update"] = 0.5
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="clip_update differs between param groups"):
        opt.step()
    with pytest.raises(ValueError, match=r"Invalid clip_update: 2"):
        CoordClippedLion(params, clip_update=2)


# -- convergence ----------------------------------------------------------------------------------------------------
CURVATURE = torch.logspace(0, 2, 40, dtype=torch.float64)  # a few stiff coordinates with large gradients
OPTIMUM = torch.linspace(-1, 1, 40, dtype=torch.float64)


@pytest.mark.parametrize(
    "cls, kwargs, lr",
    [
        (CoordClippedSGD, {"fraction": 0.1}, 1e-2),
        (CoordClippedSignSGD, {"fraction": 0.1}, 3e-3),
        (CoordClippedAdam, {"fraction": 0.5, "clip_update": 0.5}, 0.3),
        (CoordClippedLion, {"fraction": 0.5}, 1e-2),
    ],
    ids=["clipped_sgd", "clipped_signsgd", "clipped_adam", "clipped_lion"],
)
def test_converges_on_a_noisy_quadratic(cls, kwargs, lr) -> None:
    """The clip keeps the sign of every coordinate and zero only at zero, so the minimiser stays the fixed point;
    with gradient noise (as in training) and a decaying lr the iterates reach the noise floor (~1e-4 here).
    (Without noise the threshold falls towards zero once most coordinates have converged: see the docs.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.zeros(40, dtype=torch.float64))
    opt = cls([x], lr=lr, **kwargs)
    steps = 800
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)

    def loss():
        return 0.5 * (CURVATURE * (x - OPTIMUM) ** 2).sum()

    start = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        x.grad += torch.randn(40, generator=gen, dtype=torch.float64)
        opt.step()
        decay.step()
    assert loss().item() < 1e-3 * start


def test_registry_entries_and_create() -> None:
    for name in ("coordclip_sgd", "coordclip_signsgd", "coordclip_adam", "coordclip_lion"):
        info = optimlab.get(name)
        assert info.kind == "optimizer" and info.arxiv == "2306.00204" and info.capabilities.global_state
        assert info.defaults["threshold_scale"] == 1.0
    # the fractions of the paper's runs (algorithm_list.py)
    assert optimlab.get("coordclip_sgd").defaults["fraction"] == optimlab.get("coordclip_signsgd").defaults["fraction"] == 0.1
    assert (optimlab.get("coordclip_adam").defaults["fraction"], optimlab.get("coordclip_adam").defaults["clip_update"]) == (0.5, 0.0)
    assert (optimlab.get("coordclip_lion").defaults["fraction"], optimlab.get("coordclip_lion").defaults["clip_update"]) == (0.1, 1.0)
    assert optimlab.get("coordclip").defaults["fraction"] == 0.1
    opt = optimlab.create("coordclip_adam", torch.nn.Linear(2, 2), lr=3e-3, fraction=0.5)
    assert isinstance(opt, CoordClippedAdam) and opt.defaults["fraction"] == 0.5
