"""AdAdaGrad (arXiv 2402.11215): the batch-size tests against a direct float64 computation, the batch-size rule,
the sampler in a real DataLoader, the controller on noisy and noiseless problems, and AdaGrad-Norm's closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optimlab import AdaGradNorm
from optimlab.optim.adadagrad import (
    AdaptiveBatchSampler,
    BatchSizeController,
    augmented_inner_product_test,
    inner_product_test,
    next_batch_size,
    norm_test,
    orthogonality_test,
)


# -- the tests against a direct computation -------------------------------------------------------------------------
def sample_grads(b: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-sample gradients of two 'parameters' with a common mean, noise and cross-tensor correlation."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(b, 1, generator=gen, dtype=torch.float64)
    weight = 0.7 + torch.randn(b, 3, 4, generator=gen, dtype=torch.float64) + shared[:, :, None]
    bias = -0.4 + 0.5 * torch.randn(b, 5, generator=gen, dtype=torch.float64) - shared
    return {"weight": weight, "bias": bias}


def direct(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every statistic by its definition, in numpy float64, one sample at a time."""
    blocks = [g.reshape(g.shape[0], -1).numpy() for g in grads.values()]
    G = np.concatenate(blocks, axis=1)
    b = G.shape[0]
    mean = G.mean(axis=0)

    def var(rows):  # unbiased variance of each column
        rows = np.asarray(rows)
        centre = rows.mean(axis=0)
        return sum((r - centre) ** 2 for r in rows) / (b - 1)

    out = {"norm_sq": float(mean @ mean), "trace": float(np.sum(var(G)))}
    inner = [float(G[i] @ mean) for i in range(b)]
    out["ip"] = float(var(inner))
    out["orth"] = float(np.sum(var([G[i] - inner[i] / (mean @ mean) * mean for i in range(b)])))
    # the official code: each parameter tensor on its own
    ip_blocks, orth_blocks = 0.0, 0.0
    for B in blocks:
        m = B.mean(axis=0)
        inner_l = [float(B[i] @ m) for i in range(b)]
        ip_blocks += float(var(inner_l))
        orth_blocks += float(np.sum(var([B[i] - inner_l[i] / (m @ m) * m for i in range(b)])))
    out["ip_blockwise"], out["orth_blockwise"] = ip_blocks, orth_blocks
    return out


ETA, THETA, NU = 0.3, 0.4, 0.6


@pytest.mark.parametrize("blockwise", [False, True], ids=["whole", "blockwise"])
def test_statistics_equal_a_direct_computation(blockwise: bool) -> None:
    grads = sample_grads()
    ref = direct(grads)
    suffix = "_blockwise" if blockwise else ""
    ip, orth, norm_sq = ref["ip" + suffix], ref["orth" + suffix], ref["norm_sq"]
    assert ip != pytest.approx(ref["ip_blockwise" if not blockwise else "ip"], rel=1e-3)  # the two forms differ here

    result = norm_test(grads, ETA)
    assert (result.test, result.sample_size) == ("norm", 9)
    assert result.variance == pytest.approx(ref["trace"], rel=1e-12)
    assert result.grad_norm_sq == pytest.approx(norm_sq, rel=1e-12)
    assert result.estimate == pytest.approx(ref["trace"] / (ETA**2 * norm_sq), rel=1e-12)

    result = inner_product_test(grads, THETA, blockwise=blockwise)
    assert result.variance == pytest.approx(ip, rel=1e-12)
    assert result.estimate == pytest.approx(ip / (THETA**2 * norm_sq**2), rel=1e-12)

    result = orthogonality_test(grads, NU, blockwise=blockwise)
    assert result.variance == pytest.approx(orth, rel=1e-12)
    assert result.estimate == pytest.approx(orth / (NU**2 * norm_sq), rel=1e-12)

    result = augmented_inner_product_test(grads, THETA, NU, blockwise=blockwise)
    assert (result.variance, result.orthogonal_variance) == (
        pytest.approx(ip, rel=1e-12),
        pytest.approx(orth, rel=1e-12),
    )
    expected = max(ip / (THETA**2 * norm_sq**2), orth / (NU**2 * norm_sq))
    assert result.estimate == pytest.approx(expected, rel=1e-12)
    assert result.passed == (expected <= 9)


def test_inputs_as_a_list_or_one_flat_matrix_give_the_same_norm_test() -> None:
    grads = sample_grads()
    flat = torch.cat([g.reshape(9, -1) for g in grads.values()], dim=1)
    reference = norm_test(grads).estimate
    assert norm_test(list(grads.values())).estimate == pytest.approx(reference, rel=1e-12)
    assert norm_test(flat).estimate == pytest.approx(reference, rel=1e-12)
    assert inner_product_test(flat).estimate == pytest.approx(inner_product_test(grads).estimate, rel=1e-12)


def test_norm_test_estimates_d_sigma2_over_eta2_mu2() -> None:
    """g_i = μ + σ ξ_i with ξ_i standard normal in d dimensions: b̂ is close to dσ²/(η²‖μ‖²)."""
    d, b, sigma, eta = 1000, 256, 0.5, 0.2
    gen = torch.Generator().manual_seed(4)
    mu = torch.full((d,), 0.2, dtype=torch.float64)
    g = mu + sigma * torch.randn(b, d, generator=gen, dtype=torch.float64)
    estimate = norm_test(g, eta).estimate
    # ‖ḡ‖² ≈ ‖μ‖² + dσ²/b (the noise in the mean), so b̂ is slightly lower than the population value
    expected = d * sigma**2 / (eta**2 * (mu @ mu + d * sigma**2 / b).item())
    assert estimate == pytest.approx(expected, rel=0.05)
    assert estimate == pytest.approx(d * sigma**2 / (eta**2 * (mu @ mu).item()), rel=0.08)


def test_identical_samples_have_zero_variance_and_keep_the_batch() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).expand(8, 3).clone()
    for result in (norm_test(g), inner_product_test(g), orthogonality_test(g), augmented_inner_product_test(g)):
        assert result.variance == pytest.approx(0.0, abs=1e-28) and result.estimate == pytest.approx(0.0, abs=1e-24)
        assert result.passed
        assert next_batch_size(8, result.estimate, 100) == 8


def test_noise_around_a_zero_gradient_asks_for_the_largest_batch() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert norm_test(g).estimate == math.inf
    assert next_batch_size(2, math.inf, 512) == 512
    assert norm_test(torch.zeros(3, 2)).estimate == 0.0  # no gradient, no noise: nothing to learn from


def test_the_rule_never_shrinks_and_is_capped() -> None:
    assert next_batch_size(64, 10.0, 1000) == 64
    assert next_batch_size(64, 64.0, 1000) == 64
    assert next_batch_size(64, 64.2, 1000) == 65
    assert next_batch_size(64, 5000.0, 1000) == 1000
    sizes, current = [], 16
    gen = torch.Generator().manual_seed(5)
    for estimate in (torch.rand(50, generator=gen, dtype=torch.float64) * 3000).tolist():
        current = next_batch_size(current, estimate, 1000)
        sizes.append(current)
    assert sizes == sorted(sizes) and max(sizes) == 1000
    with pytest.raises(ValueError, match="NaN"):
        next_batch_size(64, math.nan, 1000)


def test_a_single_sample_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 per-sample gradients"):
        norm_test(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"Invalid eta: 0\.0"):
        norm_test(sample_grads(), 0.0)
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"Invalid batch_size: 1 .*2 <= batch_size"):
        BatchSizeController(model, F.mse_loss, AdaptiveBatchSampler(10, batch_size=1))
    with pytest.raises(ValueError, match="Invalid test"):
        BatchSizeController(model, F.mse_loss, AdaptiveBatchSampler(10, batch_size=4), test="variance")


# -- the sampler ----------------------------------------------------------------------------------------------------
def test_sampler_in_a_dataloader_follows_the_batch_size_and_covers_each_epoch() -> None:
    dataset = TensorDataset(torch.arange(23))
    sampler = AdaptiveBatchSampler(dataset, batch_size=2, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == 12
    for epoch in range(2):
        seen, sizes = [], []
        for (batch,) in loader:
            seen += batch.tolist()
            sizes.append(len(batch))
            sampler.batch_size = min(sampler.batch_size * 2, 8)
        assert sorted(seen) == list(range(23))  # every example once per epoch
        assert sizes == ([2, 4, 8, 8, 1] if epoch == 0 else [8, 8, 7])
    assert sampler.epoch == 2
    assert len(loader) == 3

    ordered = AdaptiveBatchSampler(5, batch_size=2, shuffle=False, drop_last=True)
    assert list(ordered) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="Invalid batch_size"):
        ordered.batch_size = 0


def test_sampler_resumes_from_its_state_dict() -> None:
    sampler = AdaptiveBatchSampler(40, batch_size=3, seed=7)
    stream = iter(sampler)
    for _ in range(4):
        next(stream)
    sampler.batch_size = 5
    state = sampler.state_dict()
    rest = list(stream)

    resumed = AdaptiveBatchSampler(40, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == rest
    assert resumed.epoch == sampler.epoch == 1


# -- the controller on noisy and noiseless problems, through a DataLoader --------------------------------------------
def regression(noise: float, n: int = 512, d: int = 4, identical: bool = False) -> TensorDataset:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1 if identical else n, d, generator=gen, dtype=torch.float64).expand(n, d).clone()
    w = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    y = x @ w + noise * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


def train_adaptively(dataset: TensorDataset, steps: int, **controller_options) -> tuple[list[int], list[int]]:
    """AdaGrad-Norm on ``dataset`` with the controller growing the batch; the sizes requested and the sizes seen."""
    torch.manual_seed(9)
    model = nn.Linear(dataset.tensors[0].shape[1], 1).double()
    sampler = AdaptiveBatchSampler(dataset, batch_size=4, seed=2)
    loader = DataLoader(dataset, batch_sampler=sampler)
    controller = BatchSizeController(model, F.mse_loss, sampler, **controller_options)
    opt = AdaGradNorm(model.parameters(), lr=0.5)
    requested, sizes = [], []
    while len(sizes) < steps:
        for x, y in loader:
            requested.append(sampler.batch_size)
            sizes.append(len(x))
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            controller.step(x, y)
            opt.step()
            if len(sizes) == steps:
                break
    return requested, sizes


@pytest.mark.parametrize("test", ["norm", "augmented_inner_product"])
def test_the_batch_grows_on_a_noisy_problem(test: str) -> None:
    requested, sizes = train_adaptively(
        regression(noise=0.5), 60, test=test, eta=0.5, theta=0.5, nu=1.0, max_batch_size=128
    )
    assert requested == sorted(requested)  # non-decreasing
    assert requested[0] == 4 and requested[-1] == 128  # grows, to the cap: near the optimum the noise dominates
    # the loader delivered what was asked, but for the tail of an epoch
    assert all(s == r or s < r for s, r in zip(sizes, requested)) and sum(s != r for s, r in zip(sizes, requested)) <= 2


def test_the_batch_stays_put_on_a_noiseless_problem() -> None:
    """Every example identical: all per-sample gradients are equal, so the variance is zero."""
    requested, sizes = train_adaptively(regression(noise=0.0, identical=True), 40, test="norm", eta=0.1)
    assert set(requested) == set(sizes) == {4}
    requested, _ = train_adaptively(regression(noise=0.0, identical=True), 10, test="augmented_inner_product")
    assert set(requested) == {4}


def test_controller_tests_every_interval_and_stops_at_the_cap() -> None:
    x, y = regression(noise=0.0, identical=True).tensors  # zero variance: the batch never grows
    sampler = AdaptiveBatchSampler(len(x), batch_size=4)
    controller = BatchSizeController(nn.Linear(4, 1).double(), F.mse_loss, sampler, test_interval=3)
    tested = [controller.step(x[:8], y[:8]) is not None for _ in range(7)]
    assert tested == [True, False, False, True, False, False, True]
    assert sampler.batch_size == 4 and controller.state_dict() == {"num_steps": 7}
    assert controller.step(x[:1], y[:1]) is None  # the tail of an epoch: one example, no variance

    x, y = regression(noise=1.0).tensors
    controller = BatchSizeController(nn.Linear(4, 1).double(), F.mse_loss, sampler, eta=1e-3, max_batch_size=64)
    assert controller.step(x[:8], y[:8]).estimate > 64
    assert sampler.batch_size == 64
    assert controller.step(x[:8], y[:8]) is None  # at the cap: no more tests


def test_test_sample_size_uses_the_first_examples() -> None:
    dataset = regression(noise=1.0)
    model = nn.Linear(4, 1).double()
    x, y = dataset.tensors
    capped = BatchSizeController(model, F.mse_loss, AdaptiveBatchSampler(dataset, 4), test_sample_size=16)
    alone = BatchSizeController(model, F.mse_loss, AdaptiveBatchSampler(dataset, 4))
    assert capped.run_test(x[:64], y[:64]) == alone.run_test(x[:16], y[:16])


# -- AdaGrad-Norm ---------------------------------------------------------------------------------------------------
def test_adagrad_norm_equals_its_closed_form() -> None:
    """Two groups with their own lr and weight decay, one accumulator; the second tensor skips step 2."""
    gen = torch.Generator().manual_seed(10)
    a = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    lr_a, lr_b, wd_b, b0, eps = 0.7, 0.2, 0.1, 0.05, 1e-6
    opt = AdaGradNorm(
        [{"params": [a]}, {"params": [b], "lr": lr_b, "weight_decay": wd_b}],
        lr=lr_a, eps=eps, initial_accumulator_value=b0,
    )  # fmt: skip
    xa, xb, acc = a.detach().clone(), b.detach().clone(), b0
    for step in range(4):
        ga = torch.randn(3, 2, generator=gen, dtype=torch.float64)
        gb = torch.randn(4, generator=gen, dtype=torch.float64)
        a.grad, b.grad = ga.clone(), (None if step == 1 else gb.clone())
        opt.step()
        gb_decayed = gb + wd_b * xb
        acc += (ga @ ga.T).trace().item() + (0.0 if step == 1 else (gb_decayed @ gb_decayed).item())
        xa = xa - lr_a * ga / (math.sqrt(acc) + eps)
        if step != 1:
            xb = xb - lr_b * gb_decayed / (math.sqrt(acc) + eps)
        torch.testing.assert_close(a.detach(), xa, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(b.detach(), xb, rtol=1e-14, atol=1e-14)


def test_one_accumulator_whatever_the_grouping() -> None:
    def run(groups):
        params = [nn.Parameter(torch.full((3,), float(i + 1), dtype=torch.float64)) for i in range(3)]
        opt = AdaGradNorm(groups(params), lr=0.3)
        for _ in range(5):
            opt.zero_grad()
            sum((k + 1) * p.square().sum() for k, p in enumerate(params)).backward()
            opt.step()
        return params

    together = run(lambda ps: ps)
    apart = run(lambda ps: [{"params": [p]} for p in ps])
    for x, y in zip(together, apart):
        torch.testing.assert_close(x, y, rtol=1e-15, atol=1e-15)


def test_shared_hyperparameters_cannot_differ_per_group() -> None:
    opt = AdaGradNorm([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="Invalid initial_accumulator_value.*first group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "initial_accumulator_value": 1.0})
    with pytest.raises(ValueError, match="Invalid eps"):
        AdaGradNorm([nn.Parameter(torch.zeros(2))], eps=-1.0)


def test_a_checkpoint_resumes_with_its_own_shared_hyperparameters() -> None:
    """eps and the initial accumulator live in the param groups: a loaded checkpoint's values are the ones used."""
    grads = [torch.randn(3, dtype=torch.float64) for _ in range(4)]

    def run(opt, p, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    saved = AdaGradNorm([p], eps=1e-3, initial_accumulator_value=0.5)
    run(saved, p, grads[:2])
    q = nn.Parameter(p.detach().clone())
    resumed = AdaGradNorm([q])  # the defaults, then the checkpoint
    resumed.load_state_dict(saved.state_dict())
    run(saved, p, grads[2:])
    run(resumed, q, grads[2:])
    assert torch.equal(p, q)


def test_adagrad_norm_converges_on_an_ill_conditioned_quadratic() -> None:
    """The battery's quadratic (condition number 100), at a learning rate above the battery's grid: lr is a
    distance for AdaGrad-Norm."""
    curvature = torch.logspace(0, 2, 10, dtype=torch.float64)
    optimum = torch.linspace(-1, 1, 10, dtype=torch.float64)
    x = nn.Parameter(optimum.flip(0) * 1.5)

    def loss():
        return 0.5 * (curvature * (x - optimum) ** 2).sum()

    start = loss().item()
    opt = AdaGradNorm([x], lr=10.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 600)
    for _ in range(600):
        opt.zero_grad()
        loss().backward()
        opt.step()
        decay.step()
    assert loss().item() < 1e-4 * start


def test_torch_adagrad_is_the_papers_coordinatewise_adagrad() -> None:
    """AdAdaGrad's optimizer: v ← v + g², θ ← θ − α g/(√v + ε) with v₀ = initial_accumulator_value."""
    gen = torch.Generator().manual_seed(11)
    p = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    opt = torch.optim.Adagrad([p], lr=0.3, initial_accumulator_value=0.2, eps=1e-10)
    x, v = p.detach().clone(), torch.full((5,), 0.2, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        v = v + g * g
        x = x - 0.3 * g / (v.sqrt() + 1e-10)
        torch.testing.assert_close(p.detach(), x, rtol=1e-14, atol=1e-14)
