"""WTA-CRS: unbiasedness, the variance claim, exactness at k = N, the |C| rule, saved memory, the norm cache."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import optimlab
from optimlab.nn.wtacrs import (
    ExampleNormCache,
    WTACRSLinear,
    deterministic_count,
    load_wtacrs_rng_state,
    replace_linear_layers,
    row_probabilities,
    sample_size,
    wtacrs_example_ids,
    wtacrs_linear,
    wtacrs_rng_state,
    wtacrs_sample,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only synchronise


def skewed_problem(n: int = 96, d_in: int = 12, d_out: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of X and ΔY whose norms span two orders of magnitude (a few tokens dominate, as in transformers)."""
    gen = torch.Generator().manual_seed(seed)
    scale_x = torch.exp(1.5 * torch.randn(n, 1, generator=gen, dtype=F64))
    scale_g = torch.exp(1.5 * torch.randn(n, 1, generator=gen, dtype=F64))
    x = torch.randn(n, d_in, generator=gen, dtype=F64) * scale_x
    g = torch.randn(n, d_out, generator=gen, dtype=F64) * scale_g
    return x, g


def oracle_probabilities(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return row_probabilities(x.norm(dim=1), g.norm(dim=1))


def draws(x, g, probs, k, n_draws, seed=0, **options):
    """``n_draws`` estimates of gᵀx, stacked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_draws):
        rows, weights = wtacrs_sample(probs, k, generator=gen, **options)
        out.append((g[rows] * weights[:, None]).t() @ x[rows])
    return torch.stack(out)


def max_z(estimates: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |mean − exact| in units of the empirical standard error of the mean, over all entries."""
    se = estimates.std(0) / estimates.shape[0] ** 0.5
    return ((estimates.mean(0) - exact).abs() / se).max().item()


def exact_variance(x, g, probs, n_det: int, k: int) -> float:
    """E‖est − gᵀx‖²_F of the estimator with the n_det most probable rows fixed and k − n_det i.i.d. draws from
    the rest (closed form: the sampled part is a mean of i.i.d. terms (R/p_j) g_j x_jᵀ with mean Σ_rest g_j x_jᵀ)."""
    order = probs.argsort(descending=True)
    rest = order[n_det:]
    mass = probs[rest].sum()
    terms = g[rest, :, None] * x[rest, None, :]
    second_moment = (mass * (terms**2).sum((1, 2)) / probs[rest]).sum()
    return ((second_moment - (terms.sum(0) ** 2).sum()) / (k - n_det)).item()


# -- the |C| rule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "probs, k, expected",
    [
        # scores (1 − q_c)/(k − c): c=1: 0.5/2 = 0.25, c=2: 0.3/1 = 0.3; min 0.25 < 1/3 -> |C| = 1
        ([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], 3, 1),
        # uniform: c=1: 0.9/2 = 0.45, c=2: 0.8/1 = 0.8; 1/3 < 0.45 -> plain CRS, |C| = 0
        ([0.1] * 10, 3, 0),
        # c=1: 0.6/3 = 0.2, c=2: 0.2/2 = 0.1, c=3: 0.15/1 = 0.15; min 0.1 at c=2 < 1/4 -> |C| = 2
        ([0.4, 0.4, 0.05, 0.05, 0.05, 0.05], 4, 2),
        ([0.9] + [0.02] * 5, 3, 1),  # c=1: 0.1/2 = 0.05 (c=2: 0.08/1) -> 1
        ([0.3, 0.7], 1, 0),  # k = 1: no c in [1, k) -> 0
    ],
)
def test_adaptive_deterministic_count_matches_hand_computation(probs, k, expected):
    top = torch.tensor(probs, dtype=F64).topk(k).values
    assert deterministic_count(top).item() == expected


def test_fixed_deterministic_count_is_the_floor_of_k_times_the_ratio():
    top = torch.full((7,), 0.1, dtype=F64)
    assert [deterministic_count(top, adaptive=False, deter_ratio=r).item() for r in (0.0, 0.5, 0.99)] == [0, 3, 6]


def test_sample_size_rule():
    assert sample_size(2048, 0.3, 10) == 614  # ⌊N·budget⌋
    assert sample_size(20, 0.3, 10) == 10  # minimal_k
    assert sample_size(5, 0.3, 10) == 5  # never more than N


# -- the estimator --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [{}, {"adaptive": False, "deter_ratio": 0.5}, {"adaptive": False, "deter_ratio": 0.0}]
)
def test_estimator_is_unbiased(options):
    x, g = skewed_problem()
    probs = oracle_probabilities(x, g)
    estimates = draws(x, g, probs, k=20, n_draws=2000, **options)
    # 84 entries: under unbiasedness max |z| > 5 has probability ~ 84 · 6e-7
    assert max_z(estimates, g.t() @ x) < 5


def test_unbiasedness_check_detects_missing_reweighting():
    """The statistic above has power: the official code's empty-cache branch (sampled rows weighted by 1 − P_C
    only, not divided by s·p_j) is far outside 5 standard errors."""
    x, g = skewed_problem()
    probs = row_probabilities(x.norm(dim=1))
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(1000):
        rows, weights = wtacrs_sample(probs, 20, generator=gen)
        n_det = int((weights == 1).sum())
        unweighted = torch.where(weights == 1, 1.0, 1 - probs.topk(n_det).values.sum())
        out.append((g[rows] * unweighted[:, None]).t() @ x[rows])
    assert max_z(torch.stack(out), g.t() @ x) > 5


def test_variance_below_plain_crs_on_skewed_norms():
    x, g = skewed_problem()
    probs, k = oracle_probabilities(x, g), 20
    n_det = deterministic_count(probs.topk(k).values).item()
    assert n_det > 0  # skewed norms: the rule keeps some winners
    wta, crs = exact_variance(x, g, probs, n_det, k), exact_variance(x, g, probs, 0, k)
    assert wta < 0.5 * crs  # (0.22 here)
    # the sampler realises these variances (Monte Carlo within 10%; seeds 0-3 give 0.2-2%)
    exact = g.t() @ x
    for variance, options in ((wta, {}), (crs, {"adaptive": False, "deter_ratio": 0.0})):
        estimates = draws(x, g, probs, k, n_draws=2000, seed=1, **options)
        mc = ((estimates - exact) ** 2).sum((1, 2)).mean().item()
        assert mc == pytest.approx(variance, rel=0.1)


def test_long_tail_drops_the_sampled_part():
    probs = torch.tensor([0.5, 0.4999] + [1e-4 / 8] * 8, dtype=F64)
    rows, weights = wtacrs_sample(probs, 4, generator=torch.Generator().manual_seed(0))
    assert rows[:2].tolist() == [0, 1] and weights.tolist() == [1.0, 1.0, 0.0, 0.0]


# -- the layer ------------------------------------------------------------------------------------------------
def pair(budget: float = 0.3, dtype=F64, bias: bool = True, **options) -> tuple[nn.Linear, WTACRSLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(12, 7, bias=bias, dtype=dtype)
    return linear, WTACRSLinear.from_linear(linear, budget=budget, **options)


def grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return (y, *torch.autograd.grad(y, [x, *params], g))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(4, 9, 12), (30, 12), (12,)])
def test_full_budget_is_bit_identical_to_nn_linear(dtype, shape):
    linear, layer = pair(budget=1.0, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    g = torch.randn((*shape[:-1], 7), dtype=dtype)
    for ours, theirs in zip(grads(layer, x, g), grads(linear, x, g)):
        assert torch.equal(ours, theirs)


def test_fewer_rows_than_minimal_k_is_exact():
    linear, layer = pair(budget=0.3, minimal_k=10)
    x, g = torch.randn(2, 4, 12, dtype=F64), torch.randn(2, 4, 7, dtype=F64)  # N = 8 < minimal_k
    for ours, theirs in zip(grads(layer, x, g), grads(linear, x, g)):
        assert torch.equal(ours, theirs)


def test_output_input_and_bias_gradients_are_exact_when_sampling():
    linear, layer = pair(budget=0.3)
    x, g = skewed_problem(n=200)
    x, g = x.view(8, 25, 12), g.view(8, 25, 7)
    y, gx, gw, gb = grads(layer, x, g)
    y0, gx0, gw0, gb0 = grads(linear, x, g)
    assert torch.equal(y, y0) and torch.equal(gx, gx0) and torch.equal(gb, gb0)
    assert not torch.allclose(gw, gw0)  # the weight gradient is an estimate


def test_layer_weight_gradient_is_unbiased():
    linear, layer = pair(budget=0.2)
    x, g = skewed_problem(n=120)
    x, g = x.view(4, 30, 12), g.view(4, 30, 7)
    exact = grads(linear, x, g)[2]
    estimates = torch.stack([grads(layer, x, g)[2] for _ in range(800)])
    assert max_z(estimates, exact) < 5


def test_eval_no_grad_and_frozen_weight_are_plain_linear():
    linear, layer = pair(budget=0.1)
    x, g = torch.randn(6, 20, 12, dtype=F64), torch.randn(6, 20, 7, dtype=F64)
    layer.eval()
    assert torch.equal(grads(layer, x, g)[2], grads(linear, x, g)[2])
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x))
    layer.weight.requires_grad_(False)
    x_ = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(x_), x_, g)
    assert torch.equal(gx, g @ linear.weight)


def test_same_seed_reproduces_and_global_rng_is_untouched():
    _, a = pair(seed=3)
    _, b = pair(seed=3)
    _, c = pair(seed=4)
    x, g = skewed_problem(n=200)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    ga, gb, gc = grads(a, x, g)[2], grads(b, x, g)[2], grads(c, x, g)[2]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(ga, gb) and not torch.equal(ga, gc)


# -- memory ---------------------------------------------------------------------------------------------------
def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages the forward pass saves for backward, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def test_saved_activation_memory_at_budget_03_is_at_most_half():
    torch.manual_seed(0)
    linear = nn.Linear(256, 256)
    layer = WTACRSLinear.from_linear(linear, budget=0.3)
    x = torch.randn(8, 128, 256, requires_grad=True)
    plain, ours = saved_activation_bytes(linear, x), saved_activation_bytes(layer, x)
    assert plain == x.numel() * 4
    assert ours <= 0.5 * plain  # the bar
    k = sample_size(8 * 128, 0.3, 10)
    assert ours == k * (256 * 4 + 8 + 4)  # the rows, their int64 indices and float32 weights; nothing else


# -- per-example gradient-norm cache ----------------------------------------------------------------------------
def saved_rows(layer: WTACRSLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, weights) the layer saves in one forward pass, and the output."""
    ints, floats = [], []

    def pack(t):
        (ints if t.dtype == torch.long else floats).append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    weights = [t for t in floats if t.dim() == 1 and t.shape == ints[0].shape]
    return ints[0], weights[0], y


def test_example_ids_cache_norms_and_steer_the_sample():
    _, layer = pair(budget=0.25, minimal_k=1)
    x = torch.randn(4, 10, 12, dtype=F64)  # similar row norms: by ‖x‖ alone no row stands out
    x = x / x.norm(dim=-1, keepdim=True)
    ids = torch.tensor([7, 2, 9, 0])
    g = torch.full((4, 10, 7), 1e-3, dtype=F64)
    g[1, 3] = g[2, 5] = 10.0  # two tokens carry almost all of the gradient

    rows, _, y = saved_rows(layer, x.requires_grad_())  # without ids: p ∝ ‖x‖, uniform -> plain CRS
    y.backward(g)
    assert layer.norm_cache.norms.numel() == 0

    with wtacrs_example_ids(layer, ids):  # first visit: empty cache, the ‖x‖ fallback; backward fills it
        rows, weights, y = saved_rows(layer, x)
    assert layer.example_ids is None  # restored on exit
    y.backward(g)
    expected = g.norm(dim=-1).to(torch.bfloat16)
    assert torch.equal(layer.norm_cache.norms[ids, :10], expected)
    assert torch.equal(layer.norm_cache.norms[[1, 3, 4, 5, 6, 8]], torch.zeros(6, 10, dtype=torch.bfloat16))

    with wtacrs_example_ids(layer, ids):  # second visit: p ∝ ‖x‖‖δy‖ -> the two heavy tokens are the winners
        rows, weights, _ = saved_rows(layer, x)
    heavy = {1 * 10 + 3, 2 * 10 + 5}
    assert set(rows[:2].tolist()) == heavy and weights[:2].tolist() == [1.0, 1.0]
    assert heavy.isdisjoint(rows[2:].tolist())


def buffer_changes(cache: ExampleNormCache, writes) -> int:
    """How many times the cache's storage is replaced over ``writes`` (ids, rows) pairs. The old buffers are kept
    alive, so that a new one cannot reuse an old address and go uncounted."""
    kept, changes = [], 0
    for ids, rows in writes:
        before = cache.norms.untyped_storage().data_ptr()  # (an empty view's own data_ptr() is 0)
        cache.write(ids, (ids[:, None] % 7 + 1).float().expand(-1, rows))
        if cache.norms.untyped_storage().data_ptr() != before:
            kept.append(cache.norms)
            changes += 1
    return changes


def test_norm_cache_grows_geometrically_for_increasing_ids():
    """An unshuffled loader: ids 0, 1, 2, ... in batches of 2, and a row count that grows too. Growing to the exact
    size reallocated (and copied everything) on each batch, quadratic in the dataset; doubling takes a logarithmic
    number of reallocations per dimension."""
    cache = ExampleNormCache()
    n = 4096
    writes = [(torch.arange(i, i + 2), 1 + i // 32) for i in range(0, n, 2)]  # rows: 1 .. 128
    changes = buffer_changes(cache, writes)
    assert changes <= 13 + 8, changes  # log2(4096) + 1 for the ids, log2(128) + 1 for the rows
    assert cache.norms.shape == (n, 128) and cache.capacity[0] >= n
    for ids, rows in writes[::97]:  # the contents survive the moves, and rows never written stay zero
        expected = (ids[:, None] % 7 + 1).to(torch.bfloat16).expand(-1, rows)
        assert torch.equal(cache.norms[ids, :rows], expected) and not cache.norms[ids, rows:].any()


def test_norm_cache_preallocation_and_clear():
    cache = ExampleNormCache(num_examples=100, max_rows=8)
    assert cache.norms.shape == (0, 0) and cache.capacity == (100, 8)
    assert buffer_changes(cache, [(torch.tensor([i, 99 - i]), 1 + i % 8) for i in range(50)]) == 0
    assert cache.norms.shape == (100, 8)
    torch.testing.assert_close(cache.read(torch.tensor([3]), 4, torch.device("cpu")), torch.full((4,), 4.0))
    cache.clear()
    assert cache.norms.shape == (0, 0) and cache.capacity == (100, 8)
    assert not cache.read(torch.tensor([3]), 4, torch.device("cpu")).any()
    with pytest.raises(ValueError, match="Invalid num_examples"):
        ExampleNormCache(num_examples=-1)
    with pytest.raises(ValueError, match="Invalid max_rows"):
        ExampleNormCache(max_rows=2.5)


def test_example_ids_errors():
    _, layer = pair()
    x = torch.randn(4, 10, 12, dtype=F64, requires_grad=True)
    with wtacrs_example_ids(layer, torch.tensor([0, 1, 2])), pytest.raises(ValueError, match="first dimension"):
        layer(x)
    with wtacrs_example_ids(layer, torch.tensor([0.0, 1, 2, 3])), pytest.raises(TypeError, match="integer"):
        layer(x)
    with wtacrs_example_ids(layer, torch.tensor([0, -1, 2, 3])), pytest.raises(ValueError, match="non-negative"):
        layer(x)


# -- swapping layers ------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.attn = nn.MultiheadAttention(8, 2)  # its out_proj is an nn.Linear subclass

    def forward(self, h):
        return self.mlp(self.proj(h) + self.qkv(h)[..., :8])


def test_replace_linear_layers_shares_parameters_and_keeps_an_optimizer_working():
    model = Block()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params_before = list(model.parameters())
    out = replace_linear_layers(model, predicate=lambda name, m: name.endswith(("proj", "mlp.0", "mlp.2")), budget=0.5)
    assert out is model and list(model.parameters()) == params_before
    assert {n for n, m in model.named_modules() if isinstance(m, WTACRSLinear)} == {"proj", "mlp.0", "mlp.2"}
    assert type(model.qkv) is nn.Linear and type(model.attn.out_proj) is not WTACRSLinear
    assert [m.seed for m in model.modules() if isinstance(m, WTACRSLinear)] == [0, 1, 2]
    before = model.proj.weight.detach().clone()
    model(torch.randn(5, 40, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(model.proj.weight, before)
    # the state dict is nn.Linear's: loads into a fresh plain model
    Block().load_state_dict(model.state_dict())


def test_replace_linear_layers_errors():
    with pytest.raises(TypeError, match="not a torch.nn.Linear"):
        replace_linear_layers(Block(), names=["mlp.1"])
    with pytest.raises(TypeError, match="not a torch.nn.Linear"):
        replace_linear_layers(Block(), names=["attn.out_proj"])
    with pytest.raises(KeyError, match="no submodule 'nope'"):
        replace_linear_layers(Block(), names=["nope"])
    with pytest.raises(TypeError, match="from_linear"):
        replace_linear_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        replace_linear_layers([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        WTACRSLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="budget"):
        replace_linear_layers(Block(), budget=0.0)
    layer = WTACRSLinear(4, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        layer(torch.randn(3, 4, dtype=torch.complex64))


@pytest.mark.parametrize(
    "arg, value",
    [("budget", 0.0), ("budget", 1.5), ("minimal_k", 0), ("minimal_k", 2.5), ("deter_ratio", 1.0), ("seed", -1)],
)
def test_invalid_hyperparameters_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=f"Invalid {arg}"):
        WTACRSLinear(4, 4, **{arg: value})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"budget": 0.0}, r"Invalid budget: 0\.0; expected .*0 < budget <= 1"),
        ({"budget": 1.5}, r"Invalid budget"),
        # used to crash inside torch.multinomial (k = 0 rows)
        ({"budget": 0.01, "minimal_k": 0}, r"Invalid minimal_k: 0; expected an integer with 1 <= minimal_k"),
        ({"minimal_k": 2.0}, r"Invalid minimal_k"),
        # used to become top-k with no sampled part, silently biased
        (
            {"deter_adaptive": False, "deter_ratio": 1.0},
            r"Invalid deter_ratio: 1\.0; expected .*deter_ratio < 1 .*biased",
        ),
        ({"deter_ratio": -0.1}, r"Invalid deter_ratio"),
    ],
)
def test_functional_form_validates_its_sampling_arguments(options, match):
    x, w = torch.randn(4, 25, 12, requires_grad=True), torch.randn(7, 12, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        wtacrs_linear(x, w, **options)


@pytest.mark.parametrize("name, value", [("budget", 0.0), ("budget", 2.0), ("minimal_k", 0), ("deter_ratio", 1.0)])
def test_sampling_attributes_are_validated_on_assignment(name, value):
    linear, layer = pair(budget=0.3)
    before = getattr(layer, name)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        setattr(layer, name, value)
    assert getattr(layer, name) == before


def test_assigned_sampling_attributes_take_effect_and_survive_old_pickles():
    linear, layer = pair(budget=0.3)
    layer.budget, layer.minimal_k, layer.deter_ratio = 1.0, 3, 0.25
    assert (layer.budget, layer.minimal_k, layer.deter_ratio) == (1.0, 3, 0.25)
    x, g = skewed_problem(n=200)
    for ours, theirs in zip(grads(layer, x, g), grads(linear, x, g)):  # budget 1: the exact layer
        assert torch.equal(ours, theirs)
    # a layer pickled before these were properties holds them under their public names
    state = dict(layer.__dict__)
    for name in ("budget", "minimal_k", "deter_ratio"):
        state[name] = state.pop(f"_{name}")
    old = WTACRSLinear.__new__(WTACRSLinear)
    old.__setstate__(state)
    assert (old.budget, old.minimal_k, old.deter_ratio) == (1.0, 3, 0.25)


# -- resuming -------------------------------------------------------------------------------------------------
def sampled_model() -> nn.Module:
    torch.manual_seed(0)
    return replace_linear_layers(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)), budget=0.2, seed=3)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int) -> list[torch.Tensor]:
    """``steps`` SGD steps on batches that depend on the step number only; the weight gradients of each step."""
    out = []
    for t in range(start, start + steps):
        x = torch.randn(6, 20, 12, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).square().mean().backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    return out


def test_rng_state_helpers_resume_bit_identically():
    model = sampled_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, 2, start=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": wtacrs_rng_state(model)}, buffer)
    expected = train_steps(model, opt, 3, start=2)

    def resumed(restore: bool) -> list[torch.Tensor]:
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        twin = replace_linear_layers(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)), budget=0.2, seed=3)
        twin.load_state_dict(checkpoint["model"])
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        twin_opt.load_state_dict(checkpoint["opt"])
        if restore:
            load_wtacrs_rng_state(twin, checkpoint["rng"])
        return train_steps(twin, twin_opt, 3, start=2)

    assert set(wtacrs_rng_state(model)) == {"0", "2"}
    assert all(torch.equal(a, b) for a, b in zip(resumed(True), expected))
    assert not torch.equal(resumed(False)[0], expected[0])  # the generators restart from their seeds otherwise


def test_load_rng_state_refuses_mismatched_layers():
    model = sampled_model()
    state = wtacrs_rng_state(model)
    before = model[0].generator.get_state()
    with pytest.raises(KeyError, match=r"missing \['2'\], unexpected \['9'\]"):
        load_wtacrs_rng_state(model, {"0": state["0"], "9": state["2"]})
    assert torch.equal(model[0].generator.get_state(), before)


# -- dtypes ---------------------------------------------------------------------------------------------------
def test_bfloat16_parameters_and_autocast():
    torch.manual_seed(0)
    layer = WTACRSLinear(32, 16, dtype=torch.bfloat16)
    x = torch.randn(4, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and torch.isfinite(layer.weight.grad.float()).all()

    layer32 = WTACRSLinear(32, 16)
    x32 = torch.randn(4, 64, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer32(x32)
        saved = saved_activation_bytes(layer32, x32)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert layer32.weight.grad.dtype == torch.float32 and x32.grad.dtype == torch.float32
    assert saved <= 0.5 * x32.numel() * 2  # the kept rows are saved in bfloat16


@pytest.mark.slow
def test_compiled_training_step_takes_the_same_draws_as_eager():
    torch.manual_seed(0)
    model = replace_linear_layers(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), budget=0.3)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)
    x = torch.randn(4, 50, 16)
    for _ in range(2):
        model.zero_grad(), twin.zero_grad()
        model(x).square().mean().backward()
        compiled(x).square().mean().backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_registry_entry():
    info = optimlab.get("wtacrs_linear")
    assert info.kind == "layer" and info.cls is WTACRSLinear and info.defaults["budget"] == 0.3
