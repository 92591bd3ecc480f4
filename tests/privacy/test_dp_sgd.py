"""DP-SGD-GC: the per-sample clipping bound, the noise actually drawn, the normalisation, plain SGD as a limit,
agreement with Opacus's DPOptimizer, state round trips, the per-sample-gradient API and its errors, and the private
training loop end to end."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import optimlab
from optimlab.per_sample import per_sample_grads
from optimlab.privacy import DPSGD, DiceSGD, clip_factors, epsilon, train_private

SHAPES = ((4, 3), (5,), ())


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def random_grads(batch: int, seed: int, scale: torch.Tensor | None = None, dtype=torch.float64):
    """Per-sample gradients whose records have very different norms (so some are clipped and some not)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, batch, dtype=torch.float64) if scale is None else scale
    return [
        (torch.randn((batch, *s), generator=gen, dtype=torch.float64) * scale.view(-1, *[1] * len(s))).to(dtype)
        for s in SHAPES
    ]


def flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def test_clipping_bounds_each_record_over_all_parameters() -> None:
    grads = random_grads(32, seed=1)
    C = 0.7
    f = clip_factors(grads, C)
    rows = flat(grads)
    norms = rows.norm(dim=1)
    clipped = rows * f[:, None]
    assert (clipped.norm(dim=1) <= C * (1 + 1e-12)).all()
    small = norms <= C
    assert small.any() and (~small).any()
    assert torch.equal(f[small], torch.ones_like(f[small]))  # below the threshold: untouched
    torch.testing.assert_close(clipped.norm(dim=1)[~small], torch.full_like(norms[~small], C))

    # each tensor's part below C, the record's joint norm above: clipped (the norm is over all parameters)
    parts = [torch.full((1, *s), 0.3, dtype=torch.float64) for s in SHAPES]
    assert all(p.norm() < 1.1 for p in parts) and flat(parts).norm() > 1.1
    assert clip_factors(parts, 1.1).item() == pytest.approx(1.1 / flat(parts).norm().item())
    # zero gradients stay zero, an infinite threshold clips nothing
    assert clip_factors([torch.zeros(3, 2)], 1.0).tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(clip_factors(grads, math.inf), torch.ones(32, dtype=torch.float64))


def test_noise_free_step_is_the_clipped_sum_over_the_normaliser() -> None:
    params, grads = make_params(), random_grads(6, seed=2)
    before = [p.detach().clone() for p in params]
    opt = DPSGD(params, lr=0.3, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=10.0)
    opt.step(grads)
    rows = flat(grads)
    expected_flat = flat([b.unsqueeze(0) for b in before])[0] - 0.3 / 10.0 * (
        rows * (0.5 / rows.norm(dim=1)).clamp(max=1)[:, None]
    ).sum(0)
    torch.testing.assert_close(
        flat([p.detach().unsqueeze(0) for p in params])[0], expected_flat, rtol=1e-14, atol=1e-14
    )

    # expected_batch_size=None divides by the actual number of records instead
    p_none, p_six = make_params(), make_params()
    DPSGD(p_none, lr=0.3, max_grad_norm=0.5, noise_multiplier=0.0).step(grads)
    DPSGD(p_six, lr=0.3, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=6.0).step(grads)
    torch.testing.assert_close(p_none, p_six, rtol=0, atol=0)


@pytest.mark.parametrize("sigma, C, batch_size", [(2.0, 0.5, 1.0), (1.3, 2.0, 8.0)])
def test_the_noise_drawn_has_std_sigma_c_over_the_normaliser(sigma, C, batch_size) -> None:
    p = torch.nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    opt = DPSGD([p], lr=1.0, max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=batch_size, seed=3)
    opt.step([torch.zeros(3, 200_000, dtype=torch.float64)])  # zero gradients: the step is the noise alone
    noise = -p.detach()
    std = sigma * C / batch_size
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * std / n**0.5
    assert abs(noise.std().item() - std) < 5 * std / (2 * n) ** 0.5
    # Gaussian: the fourth standardised moment is 3
    assert ((noise / std) ** 4).mean().item() == pytest.approx(3.0, abs=5 * (96 / n) ** 0.5)


def test_empty_batch_takes_a_noise_only_step_with_the_expected_normaliser() -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = DPSGD(params, noise_multiplier=1.0, expected_batch_size=4.0)
    opt.step([torch.zeros((0, *p.shape), dtype=p.dtype) for p in params])
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(RuntimeError, match="empty batch.*expected_batch_size"):
        DPSGD(make_params(), noise_multiplier=1.0).step([torch.zeros((0, *s), dtype=torch.float64) for s in SHAPES])


def test_no_noise_and_no_clipping_is_plain_sgd_with_param_groups() -> None:
    a, b = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}]  # noqa: E731
    dp = DPSGD(groups(a), lr=0.2, max_grad_norm=math.inf, noise_multiplier=0.0)
    sgd = torch.optim.SGD(groups(b), lr=0.2)
    for step in range(4):
        grads = random_grads(5, seed=10 + step)
        dp.step(grads)
        for p, g in zip(b, grads):
            p.grad = g.mean(0)
        sgd.step()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # Opacus's hooks, inputs without grad
def test_agrees_with_opacus_dpoptimizer_without_noise() -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    reference = GradSampleModule(
        torch.nn.Sequential(*[torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]).double()
    )
    reference.load_state_dict({f"_module.{k}": v for k, v in model.state_dict().items()})
    opt = DPSGD(model.parameters(), lr=0.5, max_grad_norm=0.3, noise_multiplier=0.0, expected_batch_size=12.0)
    ref_opt = DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=12
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(10, 6, generator=gen, dtype=torch.float64) * 3, torch.randint(0, 3, (10,), generator=gen)
        opt.step_batch(model, F.cross_entropy, x, y)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    # Opacus divides by the norm + 1e-6 (a relative difference of about 1e-6 / norm in each clipped record)
    torch.testing.assert_close(list(model.parameters()), list(reference.parameters()), rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_arrive_three_ways_and_p_grad_is_left_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 2, (7,))
    states = {k: v.clone() for k, v in model.state_dict().items()}
    grads = per_sample_grads(model, F.cross_entropy, x, y)

    def run(how):
        model.load_state_dict(states)
        opt = DPSGD(model.parameters(), noise_multiplier=0.8, max_grad_norm=0.1, expected_batch_size=7.0, seed=5)
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)
        grad_objects = [p.grad for p in model.parameters()]
        if how == "list":
            opt.step(list(grads.values()))
        elif how == "grad_sample":
            for p, g in zip(model.parameters(), grads.values()):
                p.grad_sample = g
            opt.step()
            opt.zero_grad()
            assert all(p.grad is None and p.grad_sample is None for p in model.parameters())
        else:
            opt.step_batch(model, F.cross_entropy, x, y)
        if how != "grad_sample":
            assert all(p.grad is g and (g == 7.0).all() for p, g in zip(model.parameters(), grad_objects))
        return [p.detach().clone() for p in model.parameters()]

    ref = run("list")
    for how in ("grad_sample", "step_batch"):
        torch.testing.assert_close(run(how), ref, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("cls", [DPSGD, DiceSGD])
def test_state_dict_round_trip_continues_bit_identically(cls) -> None:
    params = make_params()
    opt = cls(params, max_grad_norm=0.2, noise_multiplier=1.0, expected_batch_size=5.0, seed=11)
    for step in range(3):
        opt.step(random_grads(5, seed=step))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, lr=1.0, noise_multiplier=3.0, seed=99)  # the checkpoint's values win
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(3, 6):
        grads = random_grads(5, seed=step)
        opt.step(grads)
        resumed.step(grads)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [DPSGD, DiceSGD])
def test_low_precision_parameters_round_once_and_keep_float32_state(cls) -> None:
    ref, low = make_params(), make_params(dtype=torch.bfloat16)
    opt_ref = cls(ref, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0)
    opt_low = cls(low, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0)
    for step in range(4):
        grads = random_grads(4, seed=step)
        opt_ref.step(grads)
        opt_low.step([g.to(torch.bfloat16) for g in grads])
    for p, r in zip(low, ref):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.double(), r, rtol=4e-2, atol=4e-2)
        for value in opt_low.state[p].values():
            assert value.dtype == torch.float32


def test_missing_or_malformed_per_sample_gradients_raise() -> None:
    params = make_params()
    opt = DPSGD(params, expected_batch_size=2.0)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"per-sample gradients.*step\(per_sample_grads\).*step_batch"):
        opt.step()
    assert all((p.grad == 1).all() for p in params)
    good = random_grads(2, seed=0)
    with pytest.raises(ValueError, match="3 parameters"):
        opt.step(good[:2])
    with pytest.raises(ValueError, match=r"expected \(B, 4, 3\)"):
        opt.step([good[0][:, :2], *good[1:]])
    with pytest.raises(ValueError, match="different batch sizes"):
        opt.step([good[0], good[1][:1], good[2]])
    with pytest.raises(TypeError, match="mapping"):
        opt.step({"a": good[0]})
    with pytest.raises(RuntimeError, match="per-sample gradients"):
        opt.step(lambda: 0.0)  # a closure, as in torch, that leaves no per-sample gradients
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(params[0].sum()).backward()
    with pytest.raises(TypeError, match="GradScaler"):
        scaler.step(opt, good)
    with pytest.raises(TypeError, match="sparse"):
        opt.step([g.to_sparse() for g in good])
    complex_param = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(TypeError, match="complex"):
        DPSGD([complex_param]).step([torch.ones(3, 2, dtype=torch.complex128)])
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        DPSGD(params).step_batch(other, F.mse_loss, torch.zeros(3, 2), torch.zeros(3, 2))
    # parameters without per-sample gradients this step are skipped
    before = params[1].detach().clone()
    DPSGD(params, noise_multiplier=0.0).step([good[0], None, good[2]])
    assert torch.equal(params[1], before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_grad_norm": 0.0}, "Invalid max_grad_norm"),
        ({"max_grad_norm": math.inf}, "Invalid max_grad_norm.*noise_multiplier"),  # infinite noise
        ({"noise_multiplier": -1.0}, "Invalid noise_multiplier"),
        ({"noise_multiplier": math.inf}, "Invalid noise_multiplier"),
        ({"expected_batch_size": 0.0}, "Invalid expected_batch_size"),
        ({"expected_batch_size": math.inf}, "Invalid expected_batch_size"),
        ({"lr": -0.1}, "Invalid lr"),
        ({"seed": -1}, "Invalid seed"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DPSGD(make_params(), **kwargs)


def test_shared_hyperparameters_must_agree_across_groups() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="Invalid max_grad_norm.*all param groups"):
        DPSGD([{"params": params[:1]}, {"params": params[1:], "max_grad_norm": 2.0}])
    DPSGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}])  # lr may differ


def test_registry_entries() -> None:
    for name, cls in (("dp_sgd", DPSGD), ("dicesgd", DiceSGD)):
        info = optimlab.get(name)
        assert info.cls is cls and info.kind == "optimizer" and info.capabilities.stochastic
        assert set(info.hyperparameters) <= set(info.defaults)
        assert info.exemptions["grad_scaler"] and info.exemptions["convergence"]
    assert optimlab.get("dicesgd").arxiv == "2311.14632" and optimlab.get("dp_sgd").arxiv == "1607.00133"


@pytest.mark.parametrize("cls", [DPSGD, DiceSGD])
def test_train_private_end_to_end(cls) -> None:
    torch.manual_seed(0)
    n, q, epochs = 400, 0.1, 4
    x = torch.randn(n, 5)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5]) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = cls(model.parameters(), lr=0.5, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=q * n)
    first = F.cross_entropy(model(x), y).item()
    result = train_private(model, F.cross_entropy, TensorDataset(x, y), opt, sample_rate=q, epochs=epochs, seed=2)
    assert result.steps == epochs * int(1 / q) == len(result.losses)
    assert result.delta == 1 / n
    assert result.epsilon == pytest.approx(
        epsilon(noise_multiplier=0.5, sample_rate=q, steps=result.steps, delta=1 / n)
    )
    assert F.cross_entropy(model(x), y).item() < 0.7 * first
    assert ("official practice" in result.note) == (cls is DiceSGD)

    with pytest.raises(ValueError, match="expected_batch_size"):
        train_private(model, F.cross_entropy, TensorDataset(x, y), cls(model.parameters()), sample_rate=q)
    with pytest.raises(ValueError, match="Invalid delta"):
        train_private(model, F.cross_entropy, TensorDataset(x, y), opt, sample_rate=q, delta=1.0)


@pytest.mark.parametrize("cls", [DPSGD, DiceSGD])
def test_a_checkpoint_from_before_the_first_step_keeps_its_seed(cls) -> None:
    """The noise generator is created at the first step: a checkpoint taken before it carries the seed only in its
    param groups, and that seed (not the resumed constructor's) must seed the noise."""
    params = make_params()
    opt = cls(params, noise_multiplier=1.0, expected_batch_size=5.0, seed=11)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, noise_multiplier=1.0, expected_batch_size=5.0, seed=99)
    resumed.load_state_dict(opt.state_dict())
    grads = random_grads(5, seed=0)
    opt.step(grads), resumed.step(grads)
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))


def _private_run(cls, dataset, epochs_per_call, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    opt = cls(model.parameters(), lr=0.5, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=8.0, seed=3)
    result = None
    for epochs in epochs_per_call:
        more = {} if result is None else {"accountant": result.accountant, "sampler_state": result.sampler_state}
        result = train_private(model, F.cross_entropy, dataset, opt, sample_rate=0.1, epochs=epochs, **more, **kwargs)
    return [p.detach().clone() for p in model.parameters()], result


@pytest.mark.parametrize("cls", [DPSGD, DiceSGD])
def test_train_private_continues_a_run_with_fresh_batches(cls) -> None:
    """Continuing a run (its accountant and sampler state) is the uninterrupted run: the Poisson batches go on
    from where they stopped. Drawing the first epoch's batches again would break the accountant's assumption
    that every step samples afresh."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    dataset = TensorDataset(x, (x[:, 0] > 0).long())
    whole, whole_result = _private_run(cls, dataset, [2])
    parts, parts_result = _private_run(cls, dataset, [1, 1])
    assert parts_result.steps == whole_result.steps == 20
    assert parts_result.epsilon == whole_result.epsilon
    assert all(torch.equal(a, b) for a, b in zip(whole, parts))
    torch.testing.assert_close(whole_result.losses[10:], parts_result.losses, rtol=0, atol=0)

    model = torch.nn.Linear(5, 2).double()
    opt = cls(model.parameters(), expected_batch_size=8.0)
    first = train_private(model, F.cross_entropy, dataset, opt, sample_rate=0.1)
    with pytest.raises(ValueError, match="sampler_state"):
        train_private(model, F.cross_entropy, dataset, opt, sample_rate=0.1, accountant=first.accountant)


def test_train_private_reports_epsilon_at_the_delta_asked_for() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    dataset = TensorDataset(x, (x[:, 0] > 0).long())
    model = torch.nn.Linear(5, 2).double()
    opt = DPSGD(model.parameters(), noise_multiplier=1.0, expected_batch_size=8.0)
    first = train_private(model, F.cross_entropy, dataset, opt, sample_rate=0.1)
    assert first.delta == 1 / 80
    more = train_private(
        model, F.cross_entropy, dataset, opt, sample_rate=0.1, delta=1e-6,
        accountant=first.accountant, sampler_state=first.sampler_state,
    )  # fmt: skip
    assert more.delta == 1e-6
    assert more.epsilon == pytest.approx(epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=1e-6))
