"""FRUGAL: the limits ρ = 1 (AdamW) and ρ = 0 (signSGD / SGD), what the rotating projections satisfy instead, the
refresh and its bias correction, block selection, the memory bar as a byte count, and the errors."""

from __future__ import annotations

import io

import pytest
import torch

from optimlab import FRUGAL, frugal_param_groups
from optimlab.optim.frugal import select_blocks

SHAPES = ((6, 4), (3, 7), (5,))  # a tall and a wide matrix (both projectable) and a vector (regular: AdamW)


def make_params(shapes=SHAPES, dtype=torch.float64, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def gradients(params, step: int) -> list[torch.Tensor]:
    """Gradients of a fixed quadratic plus seeded noise: they depend on the optimizer's path."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [p.detach() * 0.5 + torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def run(opt: torch.optim.Optimizer, params, steps: int, start: int = 0, record: list | None = None) -> None:
    for t in range(start, start + steps):
        grads = gradients(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if record is not None:
            record.append([g.clone() for g in grads])
        opt.step()


def clone(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def state_bytes(opt: torch.optim.Optimizer, params) -> int:
    """Bytes of every state tensor of ``params``, counted from the tensors themselves."""
    return sum(
        v.numel() * v.element_size() for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)
    )


HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


# -- ρ = 1: AdamW where the projection is a coordinate subset ----------------------------------------------------------
@pytest.mark.parametrize("proj_type", ["block", "columns", "rows", "randk", "randperm"])
def test_density_one_equals_adamw(proj_type: str) -> None:
    params, ref = make_params(), make_params()
    opt = FRUGAL(params, density=1.0, update_gap=100, proj_type=proj_type, **HYPER)
    adamw = torch.optim.AdamW(ref, **HYPER)
    for t in range(8):
        run(opt, params, 1, start=t)
        run(adamw, ref, 1, start=t)
        torch.testing.assert_close(params, ref, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("proj_type", ["block", "columns", "randk"])
def test_density_one_equals_adamw_across_refreshes_without_reset(proj_type: str) -> None:
    """The full coordinate set is the same set at every refresh, so kept statistics stay AdamW's."""
    params, ref = make_params(), make_params()
    opt = FRUGAL(params, density=1.0, update_gap=2, proj_type=proj_type, reset_statistics=False, **HYPER)
    run(opt, params, 7)
    run(torch.optim.AdamW(ref, **HYPER), ref, 7)
    torch.testing.assert_close(params, ref, rtol=1e-13, atol=1e-14)


# -- ρ = 0: the state-free rule with decoupled decay ---------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
@pytest.mark.parametrize("proj_type", ["block", "svd", "random", "randperm", "columns", "randk"])
def test_density_zero_is_the_state_free_rule(proj_type: str, rule: str) -> None:
    lr, decay, proj_scale, free_scale = 0.05, 0.2, 0.5, 0.3
    params = make_params()
    opt = FRUGAL(params, lr=lr, weight_decay=decay, density=0.0, proj_type=proj_type, inactive_update_rule=rule,
                 proj_lr_scale=proj_scale, inactive_lr_scale=free_scale, update_gap=2)  # fmt: skip
    ref = make_params()
    ref_adamw = torch.optim.AdamW([ref[2]], lr=lr, weight_decay=decay)
    for t in range(5):
        grads = gradients(ref, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        with torch.no_grad():
            for w, g in zip(ref[:2], grads[:2]):
                w.mul_(1 - lr * decay).sub_(lr * proj_scale * free_scale * (g.sign() if rule == "sign_sgd" else g))
        ref[2].grad = grads[2].clone()
        ref_adamw.step()
        torch.testing.assert_close(params, ref, rtol=1e-14, atol=1e-15)
    assert "exp_avg" not in opt.state[params[0]] or opt.state[params[0]]["exp_avg"].numel() == 0


# -- GaLore-like projections: what holds instead of equality with AdamW ------------------------------------------------
def down_up(projector: torch.Tensor, right: bool):
    if right:
        return (lambda g: g @ projector.t()), (lambda x: x @ projector)
    return (lambda g: projector.t() @ g), (lambda x: projector @ x)


@pytest.mark.parametrize("proj_side", ["std", "reverse_std"])
@pytest.mark.parametrize("proj_type", ["svd", "random", "randperm"])
def test_projector_is_orthonormal_and_the_remainder_orthogonal(proj_type: str, proj_side: str) -> None:
    params = make_params()
    opt = FRUGAL(params, proj_type=proj_type, proj_side=proj_side, density=0.5, **HYPER)
    run(opt, params, 1)
    for p in params[:2]:
        projector = opt.state[p]["projector"]
        right = (p.shape[0] >= p.shape[1]) == (proj_side == "std")
        k = round((p.shape[1] if right else p.shape[0]) * 0.5)
        assert projector.shape == ((k, p.shape[1]) if right else (p.shape[0], k))
        gram = projector @ projector.t() if right else projector.t() @ projector
        torch.testing.assert_close(gram, torch.eye(k, dtype=gram.dtype), rtol=0, atol=1e-12)
        down, up = down_up(projector, right)
        g = torch.randn(p.shape, dtype=torch.float64)
        remainder = g - up(down(g))
        torch.testing.assert_close(up(down(remainder)), torch.zeros_like(g), rtol=0, atol=1e-12)


def test_svd_projector_spans_the_top_singular_vectors() -> None:
    params = make_params()
    opt = FRUGAL(params, proj_type="svd", density=0.5, **HYPER)
    grads = gradients(params, 0)
    run(opt, params, 1)
    for p, g in zip(params[:2], grads[:2]):
        right = p.shape[0] >= p.shape[1]
        down, up = down_up(opt.state[p]["projector"], right)
        k = round(min(p.shape) * 0.5)
        s = torch.linalg.svdvals(g)
        # the best rank-k approximation (Eckart-Young): the remainder holds exactly the other singular values
        torch.testing.assert_close(torch.linalg.matrix_norm(g - up(down(g))) ** 2, (s[k:] ** 2).sum())


@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize("proj_side", ["std", "reverse_std"])
def test_svd_update_is_adam_on_projected_gradients_plus_sign_of_the_remainder(proj_side: str, density: float) -> None:
    """Within one refresh window the projector is fixed, and the update is up(Adam step of the projected gradients)
    plus the signSGD step of the remainder. At ρ = 1 this is Adam in a rotated basis: not AdamW, which is not
    rotation-invariant (checked at the end)."""
    lr = 1e-2
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = FRUGAL(params, lr=lr, weight_decay=0.0, density=density, proj_type="svd", proj_side=proj_side, update_gap=10)
    record: list = []
    run(opt, params, 6, record=record)
    for i, p in enumerate(params[:2]):
        right = (p.shape[0] >= p.shape[1]) == (proj_side == "std")
        down, up = down_up(opt.state[p]["projector"], right)
        z = torch.nn.Parameter(down(torch.zeros(p.shape, dtype=torch.float64)))
        adam = torch.optim.Adam([z], lr=lr, eps=1e-8)
        free = torch.zeros(p.shape, dtype=torch.float64)
        for grads in record:
            z.grad = down(grads[i])
            adam.step()
            if density < 1:  # at ρ = 1 the remainder is zero (not the sign of its rounding noise)
                free -= lr * (grads[i] - up(down(grads[i]))).sign()
        torch.testing.assert_close(p.detach() - start[i], up(z.detach()) + free, rtol=1e-10, atol=1e-13)
    if density == 1.0:
        ref = make_params()
        run(torch.optim.AdamW(ref, lr=lr, weight_decay=0.0), ref, 6)
        assert not torch.allclose(params[0], ref[0], rtol=1e-6, atol=1e-8)


# -- coordinate projections -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proj_type", ["columns", "rows", "randk"])
def test_coordinate_state_free_part_lives_off_the_selected_coordinates(proj_type: str) -> None:
    lr, free_scale, eps = 0.1, 0.37, 1e-8
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = FRUGAL(params, lr=lr, eps=eps, weight_decay=0.0, density=0.5, proj_type=proj_type,
                 inactive_update_rule="sgd", inactive_lr_scale=free_scale)  # fmt: skip
    grads = gradients(params, 0)
    run(opt, params, 1)
    for p, p0, g in zip(params[:2], start, grads):
        indices = opt.state[p]["indices"]
        n = {"columns": p.shape[1], "rows": p.shape[0]}.get(proj_type, p.numel())
        assert indices.dtype == torch.int64 and indices.numel() == int(n * 0.5)
        selected = torch.zeros(p.shape, dtype=torch.bool)
        if proj_type == "columns":
            selected[:, indices] = True
        elif proj_type == "rows":
            selected[indices] = True
        else:
            selected.view(-1)[indices] = True
        delta = p.detach() - p0
        # selected: Adam's first step, -lr·g/(|g|+ε); elsewhere only the state-free rule, -lr·s_f·g
        torch.testing.assert_close(delta[selected], -lr * g[selected] / (g[selected].abs() + eps))
        torch.testing.assert_close(delta[~selected], -lr * free_scale * g[~selected])


# -- the refresh -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reset", [True, False])
def test_bias_correction_restarts_with_each_refresh(reset: bool) -> None:
    """With rule 'no' and columns, a refreshed subspace's first step is Adam's first step, -lr·g/(|g|+ε), exactly
    when the statistics reset."""
    lr, eps, gap = 0.1, 1e-8, 3
    params = make_params()
    opt = FRUGAL(params, lr=lr, eps=eps, weight_decay=0.0, density=0.5, proj_type="columns", update_gap=gap,
                 inactive_update_rule="no", reset_statistics=reset)  # fmt: skip
    for t in range(2 * gap + 1):
        before = params[0].detach().clone()
        grads = gradients(params, t)
        run(opt, params, 1, start=t)
        state = opt.state[params[0]]
        assert state["adam_step"] == (t % gap + 1 if reset else t + 1)
        columns = state["indices"]
        first_step = -lr * grads[0][:, columns] / (grads[0][:, columns].abs() + eps)
        matches = torch.allclose(params[0].detach()[:, columns] - before[:, columns], first_step, rtol=1e-12)
        assert matches == (t == 0 or (reset and t % gap == 0))


def test_refresh_draws_a_new_subset_every_update_gap_steps() -> None:
    params = make_params(((40, 30),))
    opt = FRUGAL(params, density=0.25, proj_type="columns", update_gap=2, **HYPER)
    drawn = []
    for t in range(6):
        run(opt, params, 1, start=t)
        drawn.append(opt.state[params[0]]["indices"].clone())
    assert all(torch.equal(drawn[i], drawn[i + 1]) for i in (0, 2, 4))
    assert not torch.equal(drawn[0], drawn[2]) and not torch.equal(drawn[2], drawn[4])


# -- block mode --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["descending", "ascending", "mirror", "random"])
@pytest.mark.parametrize("density", [0.25, 0.3, 0.5, 1.0])
def test_block_mode_activates_exactly_round_n_rho_tensors(order: str, density: float) -> None:
    n = 10
    params = make_params([(3, 2)] * n + [(4,)])
    opt = FRUGAL(params, density=density, proj_type="block", block_order=order, update_gap=2, **HYPER)
    seen: set[int] = set()
    for t in range(8):
        run(opt, params, 1, start=t)
        active = [i for i, p in enumerate(params[:n]) if opt.state[p]["active"]]
        assert len(active) == round(n * density)
        seen |= set(active)
        for i, p in enumerate(params[:n]):  # moments only for the active tensors
            assert ("exp_avg" in opt.state[p]) == (i in active)
        assert opt.param_groups[0]["block_step"] == t + 1
    if order != "random":
        assert len(seen) == min(n, 4 * round(n * density))  # 4 refreshes sweep on without repeating


def test_block_orders_follow_the_official_sequences() -> None:
    assert [select_blocks(8, 2, "descending", r) for r in range(5)] == [[6, 7], [4, 5], [2, 3], [0, 1], [6, 7]]
    assert [select_blocks(8, 3, "ascending", r) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [0, 6, 7]]
    assert [select_blocks(8, 4, "mirror", r) for r in range(3)] == [[0, 1, 6, 7], [2, 3, 4, 5], [0, 1, 6, 7]]
    assert select_blocks(5, 3, "mirror", 0) == [0, 1, 4]
    gen = torch.Generator().manual_seed(0)
    assert len(select_blocks(8, 3, "random", 0, gen)) == 3
    assert select_blocks(8, 0, "random", 0) == []


def test_block_mode_state_is_per_group() -> None:
    """Each param group is its own set of blocks with its own refresh count."""
    a, b = make_params([(3, 2)] * 4, seed=1), make_params([(3, 2)] * 2, seed=2)
    opt = FRUGAL([{"params": a}, {"params": b, "density": 0.5}], density=0.25, update_gap=3, **HYPER)
    run(opt, a + b, 1)
    assert [opt.state[p]["active"] for p in a] == [False, False, False, True]
    assert [opt.state[p]["active"] for p in b] == [False, True]


# -- the memory bar: a byte count, not a timing -------------------------------------------------------------------
def gpt_matrices(width: int = 32, layers: int = 4) -> list[tuple[int, int]]:
    """The projectable matrices of a GPT block stack: fused QKV, output projection, MLP in and out."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * layers


@pytest.mark.parametrize("proj_type", ["block", "columns", "rows"])
def test_state_of_projectable_matrices_is_within_density_plus_5_percent_of_adamw(proj_type: str) -> None:
    density = 0.25
    shapes = gpt_matrices()
    params, ref = make_params(shapes, dtype=torch.float32), make_params(shapes, dtype=torch.float32)
    adamw = torch.optim.AdamW(ref, lr=1e-3)
    run(adamw, ref, 1)
    adamw_bytes = state_bytes(adamw, ref)
    assert adamw_bytes >= 2 * 4 * sum(p.numel() for p in ref)
    opt = FRUGAL(params, density=density, proj_type=proj_type, update_gap=1, lr=1e-3)
    for t in range(4):  # every refresh of a whole descending cycle
        run(opt, params, 1, start=t)
        assert state_bytes(opt, params) <= (density + 0.05) * adamw_bytes


def test_randk_and_svd_overheads_are_what_the_state_holds() -> None:
    """The reported overheads, counted: randk keeps one int64 index per kept entry; the GaLore-like projections a
    k×c (or r×k) float matrix."""
    shape, density = (64, 48), 0.25
    for proj_type in ("randk", "svd"):
        params = make_params([shape], dtype=torch.float32)
        opt = FRUGAL(params, density=density, proj_type=proj_type, lr=1e-3)
        run(opt, params, 1)
        state = opt.state[params[0]]
        if proj_type == "randk":
            k = int(64 * 48 * density)
            assert state_bytes(opt, params) == 2 * 4 * k + 8 * k  # = 2ρ × AdamW's 8 bytes per entry
        else:
            k = round(48 * density)  # 64 >= 48: the columns are reduced
            assert state["projector"].shape == (k, 48)
            assert state_bytes(opt, params) == 2 * 4 * 64 * k + 4 * k * 48


# -- checkpoints and the generator -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [dict(proj_type="block", block_order="random"), dict(proj_type="randk"), dict(proj_type="random")],
    ids=["block-random", "randk", "random"],
)
def test_resume_across_refreshes_is_bit_identical(options: dict) -> None:
    params = make_params([(4, 3)] * 4 + [(5,)])
    opt = FRUGAL(params, density=0.5, update_gap=3, seed=7, **options, **HYPER)
    run(opt, params, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = clone(params)
    resumed = FRUGAL(resumed_params, density=0.5, update_gap=3, **options, **HYPER)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(opt, params, 7, start=4)
    run(resumed, resumed_params, 7, start=4)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_seed_changes_the_draws() -> None:
    runs = []
    for seed in (0, 0, 1):
        params = make_params([(8, 6)])
        opt = FRUGAL(params, density=0.5, proj_type="columns", seed=seed, **HYPER)
        run(opt, params, 1)
        runs.append(opt.state[params[0]]["indices"])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# -- convergence ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proj_type", ["block", "svd", "random", "columns", "randk"])
def test_converges_on_a_least_squares_problem(proj_type: str) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    b = a @ target
    weights = [torch.nn.Parameter(torch.zeros(16, 12, dtype=torch.float64)) for _ in range(2)]
    steps = 150
    opt = FRUGAL(weights, lr=0.05, weight_decay=0.0, density=0.25, proj_type=proj_type, update_gap=10)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)

    def loss() -> torch.Tensor:
        return sum(0.5 * ((a @ w - b) ** 2).mean() for w in weights)

    initial = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        decay.step()
    assert loss().item() < 1e-4 * initial


# -- the paper's parameter split ------------------------------------------------------------------------------------------
def test_frugal_param_groups_reproduces_the_official_split() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.mlp, self.norm = torch.nn.Linear(4, 4), torch.nn.Linear(4, 8), torch.nn.LayerNorm(4)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens, self.block, self.lm_head = torch.nn.Embedding(10, 4), Block(), torch.nn.Linear(4, 10)
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    model = Model()
    regular, projected = frugal_param_groups(model)
    assert projected["project"] and not regular["project"]
    assert {id(p) for p in projected["params"]} == {id(model.block.attn.weight), id(model.block.mlp.weight)}
    assert len(regular["params"]) == 7  # embedding, 2 biases, 2 norm tensors, lm_head weight and bias
    _, wider = frugal_param_groups(model, project_embeddings=True, project_logits=True)
    assert {id(model.embed_tokens.weight), id(model.lm_head.weight)} <= {id(p) for p in wider["params"]}
    opt = FRUGAL(frugal_param_groups(model), density=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    assert opt.state[model.block.attn.weight]["active"] and "active" not in opt.state[model.lm_head.weight]


# -- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [
        ("density", -0.1),
        ("density", 1.5),
        ("update_gap", 0),
        ("update_gap", 2.5),
        ("proj_type", "coordinate"),
        ("block_order", "shuffled"),
        ("proj_side", "left"),
        ("inactive_update_rule", "adam"),
        ("inactive_lr_scale", -1.0),
        ("proj_lr_scale", -0.5),
        ("reset_statistics", 1),
        ("project", "yes"),
        ("seed", -1),
        ("betas", (0.9, 1.0)),
    ],
)
def test_invalid_hyperparameters_name_the_argument(name: str, value) -> None:
    with pytest.raises(ValueError, match=rf"Invalid {name}"):
        FRUGAL(make_params(), **{name: value})
    opt = FRUGAL(make_params())
    with pytest.raises(ValueError, match=rf"Invalid {name}"):
        opt.add_param_group({"params": make_params(seed=3), name: value})


def test_functional_core_needs_a_generator_for_random_draws() -> None:
    from optimlab.optim.frugal import frugal_

    p = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="generator"):
        frugal_([p], [torch.ones(4, 3)], [{}], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                density=0.5, update_gap=10, proj_type="randk")  # fmt: skip
