"""M-FAC (arXiv 2107.03356): the dynamic and static inverse-Fisher products against a dense float64 solve, the
optimizer's step against its closed form, checkpoints, 16-bit parameters, OBS pruning and convergence."""

from __future__ import annotations

import io

import pytest
import torch

import optimlab
from optimlab import MFAC, MFACInverse, mfac_ihvp
from optimlab.optim.mfac import mfac_inverse_diagonal, obs_prune

F64 = torch.float64
SHAPES = ((4, 3), (7,), (2, 2, 2))  # d = 27
D = sum(torch.Size(s).numel() for s in SHAPES)


def dense_fisher(rows: torch.Tensor, damp: float, m: int | None = None) -> torch.Tensor:
    """λI + GᵀG/m from the gradients seen (rows), normalised by the window size m."""
    m = rows.shape[0] if m is None else m
    return damp * torch.eye(rows.shape[1], dtype=rows.dtype) + rows.T @ rows / m


def block_fisher(rows: torch.Tensor, damp: float, block_size: int) -> torch.Tensor:
    d = rows.shape[1]
    fisher = torch.zeros(d, d, dtype=rows.dtype)
    for start in range(0, d, block_size):
        block = slice(start, min(d, start + block_size))
        fisher[block, block] = dense_fisher(rows[:, block], damp)
    return fisher


def make_params(dtype=F64, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(dtype)) for s in SHAPES]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def split(vector: torch.Tensor) -> list[torch.Tensor]:
    return [part.reshape(s) for part, s in zip(vector.split([torch.Size(s).numel() for s in SHAPES]), SHAPES)]


def random_grads(count: int, seed: int = 1, d: int = D) -> torch.Tensor:
    return torch.randn(count, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- the dynamic algorithm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pushes", [1, 5, 8, 8 + 5, 3 * 8 + 2], ids=lambda n: f"{n}-pushes")
def test_step_is_the_inverse_fisher_product_of_the_sliding_window(pushes: int) -> None:
    """Each step moves by -lr·F⁻¹g with F = λI + (1/m)Σ g gᵀ over the last m gradients (zero rows before the window
    fills, still normalised by m), to rtol 1e-8 in float64; and ``ihvp`` gives F⁻¹x for any x."""
    m, damp, lr = 8, 1e-3, 0.5
    params = make_params()
    opt = MFAC(params, lr=lr, ngrads=m, damp=damp)
    grads = random_grads(pushes)
    for t, g in enumerate(grads):
        for p, part in zip(params, split(g)):
            p.grad = part.clone()
        before = flat(params)
        opt.step()
        seen = grads[max(0, t + 1 - m) : t + 1]
        expected = torch.linalg.solve(dense_fisher(seen, damp, m), g)
        torch.testing.assert_close((before - flat(params)) / lr, expected, rtol=1e-8, atol=1e-8 * expected.abs().max())
    x = random_grads(1, seed=9)[0]
    expected = torch.linalg.solve(dense_fisher(grads[-m:], damp, m), x)
    torch.testing.assert_close(flat(opt.ihvp(split(x))), expected, rtol=1e-8, atol=0)
    # the dynamic window and the static algorithm on the same last m gradients, in any row order
    order = torch.randperm(min(m, pushes), generator=torch.Generator().manual_seed(3))
    last = grads[-m:][order]
    rows = torch.cat([last, torch.zeros(m - last.shape[0], D, dtype=F64)])
    torch.testing.assert_close(mfac_ihvp(rows, x, damp=damp), expected, rtol=1e-8, atol=0)


def test_ihvp_before_any_step_is_x_over_damp_and_idle_parameters_count_as_zero_columns() -> None:
    params = make_params()
    opt = MFAC(params, lr=0.1, ngrads=4, damp=1e-2)
    x = random_grads(1, seed=2)[0]
    torch.testing.assert_close(flat(opt.ihvp(split(x))), x / 1e-2, rtol=1e-14, atol=0)
    grads = random_grads(3)
    for g in grads:
        params[0].grad, params[1].grad, params[2].grad = split(g)[0], split(g)[1], None
        opt.step()
    rows = grads.clone()
    rows[:, 19:] = 0  # the third parameter never had a gradient
    expected = torch.linalg.solve(dense_fisher(rows, 1e-2, 4), x)
    torch.testing.assert_close(flat(opt.ihvp(split(x))), expected, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        opt.ihvp(split(x)[:2])


def test_float32_ihvp_in_the_gradient_span_matches_a_float64_solve() -> None:
    """At the default damp 1e-5, F⁻¹x for x in the span of G is (x − GᵀS⁻¹Gx)/λ with the two terms equal to ~1e-7
    relative: computed in float32 (or with the float32-rounded K alone) the result was off by a relative 0.3-3.
    Now it is float32 rounding of the float64 solve on the same float32 gradients (measured ~3e-8 in norm)."""
    m, d, damp = 16, 1500, 1e-5
    param = torch.nn.Parameter(torch.zeros(2, d // 2))
    opt = MFAC([param], lr=0.0, ngrads=m, damp=damp)
    grads = torch.randn(m + 3, d, generator=torch.Generator().manual_seed(4))  # the ring has wrapped
    for g in grads:
        param.grad = g.view(param.shape).clone()
        opt.step()
    window = grads[-m:].double()
    fisher = dense_fisher(window, damp)
    mix = torch.randn(m, generator=torch.Generator().manual_seed(5))
    for x in (grads[-1], (mix @ grads[-m:]), torch.randn(d, generator=torch.Generator().manual_seed(6))):
        result = opt.ihvp([x.view(param.shape)])[0]
        assert result.dtype == torch.float32 and result.shape == param.shape
        expected = torch.linalg.solve(fisher, x.double())
        error = (result.reshape(-1).double() - expected).norm() / expected.norm()
        assert error < 1e-6, error


@pytest.mark.parametrize("block_size", [None, 500])
def test_float32_static_product_in_the_gradient_span_matches_a_float64_solve(block_size) -> None:
    """The static form has the same cancellation at the default damp: its Gram matrix, products with G and
    subtraction run in float64 on column chunks, so float32 gradients give float32 rounding of the exact solve
    (in float32 throughout the relative error was O(1))."""
    m, d, damp = 16, 1500, 1e-5
    grads = torch.randn(m, d, generator=torch.Generator().manual_seed(4))
    inverse = MFACInverse(grads, damp=damp, block_size=block_size)
    mix = torch.randn(m, generator=torch.Generator().manual_seed(5))
    vectors = torch.stack([grads[-1], mix @ grads, torch.randn(d, generator=torch.Generator().manual_seed(6))])
    result = inverse.mul(vectors)
    assert result.dtype == torch.float32
    width = d if block_size is None else block_size
    for start in range(0, d, width):
        block = grads[:, start : start + width].double()
        fisher = dense_fisher(block, damp)
        for row in range(3):
            expected = torch.linalg.solve(fisher, vectors[row, start : start + width].double())
            got = result[row, start : start + width].double()
            assert ((got - expected).norm() / expected.norm()) < 1e-6


def test_missing_gradient_pushes_a_zero_slice_and_leaves_the_parameter_unmoved() -> None:
    m, damp, lr = 4, 1e-3, 0.3
    params = make_params()
    opt = MFAC(params, lr=lr, ngrads=m, damp=damp)
    grads = random_grads(7)
    pushed = []
    for t, g in enumerate(grads):
        parts = split(g)
        idle = t in (2, 3)
        for i, (p, part) in enumerate(zip(params, parts)):
            p.grad = None if (idle and i == 1) else part.clone()
        if idle:
            g = g.clone()
            g[12:19] = 0
        pushed.append(g)
        before = flat(params)
        opt.step()
        seen = torch.stack(pushed[-m:])
        step = torch.linalg.solve(dense_fisher(seen, damp, m), g)
        if idle:
            step[12:19] = 0  # not applied to the parameter without a gradient
        torch.testing.assert_close((before - flat(params)) / lr, step, rtol=1e-8, atol=1e-8 * step.abs().max())


def test_per_group_lr_weight_decay_and_momentum() -> None:
    """Weight decay is L2 into the pushed gradient (official); momentum is an EMA of the steps F⁻¹g (official);
    each group's lr, decay and momentum apply to its slice of the one update."""
    m, damp = 4, 1e-2
    lrs, decays, momenta = (0.2, 0.05), (0.0, 0.1), (0.0, 0.9)
    params = make_params()
    groups = [
        {"params": params[:2], "lr": lrs[0], "weight_decay": decays[0], "momentum": momenta[0]},
        {"params": params[2:], "lr": lrs[1], "weight_decay": decays[1], "momentum": momenta[1]},
    ]
    opt = MFAC(groups, ngrads=m, damp=damp)
    grads = random_grads(6)
    theta = flat(params).clone()
    buffer = torch.zeros(D, dtype=F64)
    pushed = []
    first = slice(0, 19)
    second = slice(19, D)
    for g in grads:
        for p, part in zip(params, split(g)):
            p.grad = part.clone()
        opt.step()
        decayed = g.clone()
        decayed[second] += decays[1] * theta[second]
        pushed.append(decayed)
        u = torch.linalg.solve(dense_fisher(torch.stack(pushed[-m:]), damp, m), decayed)
        buffer[second] = momenta[1] * buffer[second] + (1 - momenta[1]) * u[second]
        theta[first] -= lrs[0] * u[first]
        theta[second] -= lrs[1] * buffer[second]
        torch.testing.assert_close(flat(params), theta, rtol=1e-10, atol=1e-10)
    for p, g in zip(params, split(grads[-1])):
        assert torch.equal(p.grad, g)  # gradients are read only


# -- numerics --------------------------------------------------------------------------------------------------------
def test_float32_step_keeps_its_accuracy_at_small_damp() -> None:
    """The step as m·Gᵀ S⁻¹ e_j has no 1/λ cancellation: in float32 at λ = 1e-5 it agrees with the float64 dense
    solve on the same data to rtol 1e-4, where the general form (x − GᵀS⁻¹Gx)/λ in float32 is off by a relative
    error of ~2 on this data."""
    m, d, damp = 16, 1500, 1e-5
    grads = random_grads(m + 1, d=d)  # the last one slides the window by one
    param = torch.nn.Parameter(torch.zeros(d))
    opt = MFAC([param], lr=1.0, ngrads=m, damp=damp)
    for g in grads[:m]:
        param.grad = g.float()
        opt.step()
    before = param.detach().double().clone()
    param.grad = grads[m].float()
    opt.step()
    rows = grads[1:].float().double()
    expected = torch.linalg.solve(dense_fisher(rows, damp), rows[-1])
    step = before - param.detach().double()
    # the parameter is rounded to float32 after the update: compare with the float32 spacing of its values
    atol = 4 * torch.finfo(torch.float32).eps * (before.abs().max() + expected.abs().max())
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 4e-2)], ids=["float32", "bfloat16"])
def test_low_precision_parameters_track_float64_when_well_damped(dtype: torch.dtype, tol: float) -> None:
    """The battery's check at damp 1e-2 (at the default 1e-5 the method amplifies rounding, see the registry)."""
    gen = torch.Generator().manual_seed(5)
    target = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]

    def run(params):
        opt = MFAC(params, lr=1e-2, ngrads=8, damp=1e-2)
        for _ in range(6):
            opt.zero_grad()
            sum(((p - t.to(p.dtype)) ** 2).sum() for p, t in zip(params, target)).backward()
            opt.step()
        return opt

    ref, low = make_params(), make_params(dtype)
    run(ref)
    opt = run(low)
    for p, r in zip(low, ref):
        assert p.dtype == dtype
        torch.testing.assert_close(p.double(), r, rtol=tol, atol=tol)
    for p in low:
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.dtype == torch.float32


def test_state_is_the_window_plus_an_m_by_m_matrix() -> None:
    m = 6
    params = make_params(torch.float32)
    opt = MFAC(params, ngrads=m)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert sum(t.numel() * t.element_size() for t in tensors) == m * D * 4 + m * m * 4
    assert all(isinstance(v, int) for s in opt.state.values() for v in s.values() if not torch.is_tensor(v))
    for p in params:
        assert opt.state[p]["grad_window"].shape == (m, p.numel())


def test_checkpoint_round_trip_continues_bit_identically_through_the_ring() -> None:
    m = 4
    grads = random_grads(2 * m + 3)
    params = make_params()
    opt = MFAC(params, lr=0.1, ngrads=m, damp=1e-3, momentum=0.5, weight_decay=0.01)
    for g in grads[: m + 1]:  # past one wrap of the ring
        for p, part in zip(params, split(g)):
            p.grad = part.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = MFAC(resumed_params, lr=1.0, ngrads=m)  # the checkpoint's hyperparameters win
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grads[m + 1 :]:
        for o, ps in ((opt, params), (resumed, resumed_params)):
            for p, part in zip(ps, split(g)):
                p.grad = part.clone()
            o.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"damp": 0.0}, r"Invalid damp: 0\.0; expected a number with 0 < damp"),
        ({"ngrads": 0}, r"Invalid ngrads: 0; expected an integer with 1 <= ngrads"),
        ({"ngrads": 2.0}, r"Invalid ngrads: 2\.0"),
        ({"momentum": 1.0}, r"Invalid momentum: 1\.0; expected a number with 0 <= momentum < 1"),
        ({"weight_decay": -1.0}, r"Invalid weight_decay"),
        ({"lr": -1.0}, r"Invalid lr"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MFAC(make_params(), **kwargs)


def test_window_shape_errors() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="ngrads"):
        MFAC([{"params": params[:1]}, {"params": params[1:], "ngrads": 8}], ngrads=4)
    opt = MFAC(params, ngrads=4)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for group in opt.param_groups:
        group["ngrads"] = 8
    with pytest.raises(RuntimeError, match="cannot change during a run"):
        opt.step()


def test_static_input_errors() -> None:
    grads = random_grads(3, d=10)
    with pytest.raises(TypeError, match=r"\(m, d\) tensor"):
        MFACInverse(grads[0])
    with pytest.raises(TypeError, match=r"\(m, d\) tensor"):
        MFACInverse(grads.long())
    with pytest.raises(ValueError, match=r"Invalid damp: -1"):
        MFACInverse(grads, damp=-1.0)
    with pytest.raises(ValueError, match=r"Invalid block_size: 0"):
        MFACInverse(grads, block_size=0)
    with pytest.raises(ValueError, match="last dimension"):
        mfac_ihvp(grads, torch.ones(9, dtype=F64))
    with pytest.raises(ValueError, match=r"Invalid num_prune: 11"):
        obs_prune(torch.ones(10, dtype=F64), MFACInverse(grads), 11)


# -- the static algorithm --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 5, 7, 30], ids=lambda b: f"block_size={b}")
def test_static_product_and_diagonal_against_the_dense_inverse(block_size) -> None:
    """Blocks of ``block_size`` consecutive coordinates (the last one shorter: 23 = 4·5 + 3 = 3·7 + 2), each with
    its own damped Fisher; one block for None or a size >= d. Batches of vectors are rows."""
    m, d, damp = 6, 23, 1e-3
    grads = random_grads(m, d=d)
    fisher = block_fisher(grads, damp, block_size or d)
    inverse = MFACInverse(grads, damp=damp, block_size=block_size)
    x = random_grads(4, seed=7, d=d).reshape(2, 2, d)
    expected = torch.linalg.solve(fisher, x.reshape(-1, d).T).T.reshape(2, 2, d)
    torch.testing.assert_close(inverse.mul(x), expected, rtol=1e-8, atol=0)
    torch.testing.assert_close(inverse @ x[0, 0], expected[0, 0], rtol=1e-8, atol=0)
    dense_diagonal = torch.linalg.inv(fisher).diagonal()
    torch.testing.assert_close(inverse.diagonal(), dense_diagonal, rtol=1e-8, atol=0)
    torch.testing.assert_close(mfac_inverse_diagonal(grads, damp, block_size), dense_diagonal, rtol=1e-8, atol=0)


def test_static_result_is_invariant_to_the_order_of_the_gradients() -> None:
    grads = random_grads(9, d=40)
    x = random_grads(1, seed=4, d=40)[0]
    shuffled = grads[torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    for block_size in (None, 16):
        a, b = MFACInverse(grads, 1e-3, block_size), MFACInverse(shuffled, 1e-3, block_size)
        torch.testing.assert_close(a.mul(x), b.mul(x), rtol=1e-10, atol=0)
        torch.testing.assert_close(a.diagonal(), b.diagonal(), rtol=1e-10, atol=0)


def test_diagonal_in_chunks(monkeypatch) -> None:
    from optimlab.optim import mfac

    grads = random_grads(5, d=37)
    expected = MFACInverse(grads, 1e-2).diagonal()
    monkeypatch.setattr(mfac, "_DIAGONAL_CHUNK", 5 * 4)  # 4 columns at a time
    torch.testing.assert_close(MFACInverse(grads, 1e-2).diagonal(), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        MFACInverse(grads, 1e-2, block_size=10).diagonal(), block_diagonal_reference(grads), rtol=1e-8, atol=0
    )


def block_diagonal_reference(grads: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(block_fisher(grads, 1e-2, 10)).diagonal()


def test_obs_prune_removes_the_lowest_scores_with_the_optimal_correction() -> None:
    """One pruned weight q: δ = −θ_q F⁻¹e_q / [F⁻¹]_qq is the minimiser of ½δᵀFδ subject to δ_q = −θ_q (OBS)."""
    m, d, damp = 5, 12, 1e-2
    grads = random_grads(m, d=d)
    weights = torch.randn(d, generator=torch.Generator().manual_seed(8), dtype=F64)
    inverse = MFACInverse(grads, damp)
    fisher = dense_fisher(grads, damp)
    diagonal = torch.linalg.inv(fisher).diagonal()
    q = int(torch.argmin(weights**2 / (2 * diagonal)))
    pruned, kept = obs_prune(weights, inverse, 1)
    assert not kept[q] and kept.sum() == d - 1 and pruned[q] == 0
    # the constrained minimiser by a dense KKT solve
    e = torch.zeros(d, dtype=F64)
    e[q] = 1
    kkt = torch.zeros(d + 1, d + 1, dtype=F64)
    kkt[:d, :d], kkt[:d, d], kkt[d, :d] = fisher, e, e
    rhs = torch.cat([torch.zeros(d, dtype=F64), -weights[q : q + 1]])
    delta = torch.linalg.solve(kkt, rhs)[:d]
    torch.testing.assert_close(pruned, (weights + delta).masked_fill(~kept, 0), rtol=1e-9, atol=1e-12)
    # several at once: the lowest scores go, the rest keep the summed single-weight corrections
    pruned, kept = obs_prune(weights, inverse, 4)
    scores = weights**2 / (2 * diagonal)
    assert set(torch.nonzero(~kept).flatten().tolist()) == set(torch.argsort(scores)[:4].tolist())
    assert torch.all(pruned[~kept] == 0)


# -- registry and convergence -----------------------------------------------------------------------------------------
def test_registry_entries() -> None:
    info = optimlab.get("mfac")
    assert info.kind == "optimizer" and info.capabilities.global_state and info.arxiv == "2107.03356"
    assert info.defaults == {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "ngrads": 1024, "damp": 1e-5}
    function = optimlab.get("mfac_ihvp")
    assert function.kind == "function" and function.cls is mfac_ihvp
    assert function.defaults == {"damp": 1e-5, "block_size": None}


def test_converges_on_noisy_logistic_regression() -> None:
    """Minibatch logistic regression with features scaled over a decade (a Hessian condition number of ~1e3): with
    a linearly decaying lr, M-FAC gets within 1% of the initial excess loss of the optimum (found by L-BFGS on the
    full batch). (On a noiseless problem the empirical Fisher is no curvature: see the registry's convergence
    exemption.)"""
    gen = torch.Generator().manual_seed(0)
    n, d = 2048, 10
    scales = torch.logspace(0, 1, d, dtype=F64)
    features = torch.randn(n, d, generator=gen, dtype=F64) * scales
    truth = torch.randn(d, generator=gen, dtype=F64) / scales
    labels = (torch.rand(n, generator=gen, dtype=F64) < torch.sigmoid(features @ truth)).to(F64)

    def loss(w, rows=slice(None)):
        return torch.nn.functional.binary_cross_entropy_with_logits(features[rows] @ w, labels[rows])

    w = torch.zeros(d, dtype=F64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([w], max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value = loss(w)
        value.backward()
        return value

    lbfgs.step(closure)
    optimum = loss(w).item()

    def excess(make, steps=300):
        x = torch.nn.Parameter(torch.zeros(d, dtype=F64))
        opt = make([x])
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
        batches = torch.Generator().manual_seed(1)
        for _ in range(steps):
            opt.zero_grad()
            loss(x, torch.randint(n, (32,), generator=batches)).backward()
            opt.step()
            decay.step()
        return loss(x.detach()).item() - optimum

    start = loss(torch.zeros(d, dtype=F64)).item() - optimum
    assert excess(lambda p: MFAC(p, lr=3e-3, ngrads=32, damp=1e-3)) < 0.01 * start
