"""Error feedback in the single-process simulator and its functional core: the telescoping identities of EF14, EF21
and EControl, identity compressor = plain distributed SGD, η = 0 = EF21 bit for bit, EControl's virtual iterate,
convergence on heterogeneous quadratics where uncompensated Top-K does not, bytes, state round trip, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import optimlab
from optimlab.distributed.compressors import Identity, RandK, ScaledSign, TopK
from optimlab.distributed.error_feedback import (
    EF14,
    EF21,
    CompressedSGD,
    EControl,
    Simulator,
    server_direction,
    worker_message,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N, D = 4, 30


def _grads(step: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1000 + step), dtype=dtype)


def _schemes(compressor):
    return [CompressedSGD(compressor), EF14(compressor), EF21(compressor), EControl(compressor, eta=0.3)]


# -- identities of the functional core ---------------------------------------------------------------------------
def _rounds(scheme: str, compressor, steps: int, eta: float = 0.0):
    """Run the core on random gradients; yield (g, sent messages Δ (decoded), state after) per round."""
    state: dict = {}
    for t in range(steps):
        g = _grads(t)
        comp, wire, ctx = worker_message(scheme, state, g, compressor, None, eta)
        yield g, comp.decode(wire, ctx, D).clone(), {k: v.clone() for k, v in state.items()}


def test_ef14_telescopes() -> None:
    # Σ_t Δ_i^t + e_i^T = Σ_t g_i^t: what was not sent yet is exactly the residual
    sent, total = torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    for g, delta, state in _rounds("ef14", TopK(0.1), 30):
        sent += delta
        total += g
        torch.testing.assert_close(sent + state["e"], total, rtol=0, atol=1e-12)


def test_ef21_telescopes() -> None:
    # h_i^T = g_i^0 + Σ_{t≥1} Δ_i^t, and each Δ_i = C(g_i − h_i) with h_i tracking g_i
    h = None
    for t, (g, delta, state) in enumerate(_rounds("ef21", TopK(0.1), 30)):
        if t == 0:
            assert torch.equal(delta, g) and torch.equal(state["h"], g)  # uncompressed first round
            h = g.clone()
        else:
            torch.testing.assert_close(delta, TopK(0.1).compress(g - h), rtol=0, atol=0)
            h = h + delta
        torch.testing.assert_close(state["h"], h, rtol=0, atol=0)


def test_econtrol_per_worker_identity() -> None:
    # e_i^{t+1} + h_i^{t+1} = e_i^t + g_i^t: the error plus the estimate absorb each gradient exactly
    prev = None
    for t, (g, _, state) in enumerate(_rounds("econtrol", TopK(0.1), 30, eta=0.3)):
        if t == 0:
            assert torch.equal(state["e"], torch.zeros_like(g)) and torch.equal(state["h"], g)
        else:
            torch.testing.assert_close(state["e"] + state["h"], prev + g, rtol=0, atol=1e-12)
        prev = state["e"].clone()


def test_server_h_is_the_mean_of_the_workers_h() -> None:
    for method in (EF21(TopK(0.1)), EControl(TopK(0.1), eta=0.2)):
        sim = method.simulator(N)
        for t in range(20):
            sim(_grads(t))
            torch.testing.assert_close(sim.state["server_h"], sim.state["h"].mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "method", [EF14(TopK(0.1)), EControl(TopK(0.1), eta=0.3), EControl(ScaledSign(), eta=1.0)], ids=repr
)
def test_virtual_iterate_follows_plain_sgd(method) -> None:
    # x̃ = x − γ·mean_i e_i satisfies x̃_{t+1} = x̃_t − γ·mean_i g_i^t, to round-off, for any compressor and η
    gamma = 0.1
    sim = method.simulator(N)
    x = torch.zeros(D, dtype=torch.float64)
    virtual = x.clone()
    worst = 0.0
    for t in range(50):
        g = _grads(t)
        x = x - gamma * sim(g)
        virtual = virtual - gamma * g.mean(0)
        worst = max(worst, (x - gamma * sim.state["e"].mean(0) - virtual).abs().max().item())
    assert worst < 1e-13


def test_econtrol_with_the_previous_h_would_break_the_virtual_iterate() -> None:
    # the updated-h order is the one with the identity (spec §13): stepping with h before the update drifts
    sim = EControl(TopK(0.1), eta=0.3).simulator(N)
    x = torch.zeros(D, dtype=torch.float64)
    virtual = x.clone()
    h_prev = None
    for t in range(10):
        g = _grads(t)
        direction = sim(g)
        x = x - 0.1 * (direction if h_prev is None else h_prev)
        h_prev = direction
        virtual = virtual - 0.1 * g.mean(0)
    assert (x - 0.1 * sim.state["e"].mean(0) - virtual).abs().max() > 1e-3


# -- reductions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(4), ids=["none", "ef14", "ef21", "econtrol"])
def test_identity_compressor_is_plain_distributed_sgd(index) -> None:
    sim = _schemes(Identity())[index].simulator(N)
    for t in range(20):
        g = _grads(t)
        direction = sim(g)
        expected = (g / N).sum(0)  # DDP's average: divide, then sum
        if index < 2:
            assert torch.equal(direction, expected)  # e stays exactly 0
        else:  # h + (g − h) rounds
            torch.testing.assert_close(direction, expected, rtol=0, atol=1e-14)


def test_eta_zero_is_ef21_bit_for_bit() -> None:
    a, b = EControl(TopK(0.1), eta=0.0).simulator(N), EF21(TopK(0.1)).simulator(N)
    x = torch.zeros(D)
    for t in range(30):
        g = _grads(t, torch.float32) + x
        da, db = a(g), b(g)
        assert torch.equal(da, db)
        x = x - 0.1 * da
    assert torch.equal(a.state["h"], b.state["h"])


def test_direction_is_a_copy() -> None:
    sim = EF21(TopK(0.1)).simulator(N)
    sim(_grads(0))
    direction = sim(_grads(1))
    direction.zero_()
    assert sim.state["server_h"].abs().sum() > 0


# -- the claim: heterogeneous quadratics with Top-K ---------------------------------------------------------------
def _quadratics(n: int = 10, d: int = 50):
    """f_i(x) = ½ xᵀA_i x − b_iᵀx with different diagonal A_i and far-apart b_i (heterogeneous workers)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(n, d, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    b = torch.randn(n, d, generator=gen, dtype=torch.float64) * 10
    x_star = b.sum(0) / a.sum(0)
    return a, b, x_star


def _solve(method, steps: int = 2000, gamma: float = 0.2) -> float:
    a, b, x_star = _quadratics()
    sim = method.simulator(a.shape[0])
    x = torch.zeros_like(x_star)
    for _ in range(steps):
        x = x - gamma * sim(a * x - b)
    return ((x - x_star).norm() / x_star.norm()).item()


def test_econtrol_converges_where_compressed_sgd_does_not() -> None:
    top = TopK(0.1)
    assert _solve(EControl(top, eta=0.1)) < 1e-6
    assert _solve(EF21(top)) < 1e-6
    assert _solve(CompressedSGD(top)) > 1e-1  # biased compression without feedback stalls far away


# -- bytes, state, errors ------------------------------------------------------------------------------------------
def test_bytes_per_worker() -> None:
    sim = EF21(TopK(0.1)).simulator(N)
    sim(_grads(0, torch.float32))
    assert sim.bytes_per_worker == D * 4  # uncompressed first round
    sim(_grads(1, torch.float32))
    assert sim.bytes_per_worker == TopK(0.1).wire_bytes(D) == 3 * 8
    assert sim.bytes_sent == D * 4 + 24
    sim = EF14(ScaledSign()).simulator(N)
    sim(_grads(0, torch.float32))
    assert sim.bytes_per_worker == 4 + 4  # 30 signs in 4 bytes + the scale


@pytest.mark.parametrize("compressor", [TopK(0.2), RandK(0.2)], ids=repr)
def test_simulator_state_round_trip(compressor) -> None:
    method = EControl(compressor, eta=0.2, seed=3)
    sim = method.simulator(N)
    for t in range(5):
        sim(_grads(t))
    buf = io.BytesIO()
    torch.save(sim.state_dict(), buf)
    buf.seek(0)
    restored = method.simulator(N)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for t in range(5, 10):
        assert torch.equal(sim(_grads(t)), restored(_grads(t)))
    assert restored.steps == 10 and restored.bytes_sent == sim.bytes_sent


def test_world_size_mismatch_on_load() -> None:
    sim = EF21(TopK(0.2)).simulator(N)
    sim(_grads(0))
    with pytest.raises(ValueError, match="world size mismatch: the state has 4 workers, this simulator 3"):
        EF21(TopK(0.2)).simulator(3).load_state_dict(sim.state_dict())
    with pytest.raises(ValueError, match="scheme 'ef21' cannot load into 'ef14'"):
        EF14(TopK(0.2)).simulator(N).load_state_dict(sim.state_dict())


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="eta"):
        EControl("topk", 0.1)  # η is required
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="Invalid eta"):
            EControl("topk", 0.1, eta=eta)
    for ratio in (0.0, 1.2):
        with pytest.raises(ValueError, match="Invalid ratio"):
            EF21("topk", ratio)
    with pytest.raises(ValueError, match="Invalid n_workers"):
        Simulator(EF21(), 0)
    with pytest.raises(ValueError, match=r"grads must be \(4, d\)"):
        EF21().simulator(N)(torch.zeros(3, D))
    with pytest.raises(ValueError, match="Invalid scheme"):
        worker_message("ef15", {"h": torch.zeros(3)}, torch.zeros(3), TopK(0.5))
    with pytest.raises(ValueError, match="not contractive"):
        EControl(RandK(0.1), eta=0.1).theory_eta(100)


def test_hook_without_process_group() -> None:
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        EF21().hook(nn.Linear(2, 1))


def test_theory_eta() -> None:
    assert EControl(TopK(0.1), eta=0.1).theory_eta(1000) == pytest.approx(0.1 / 400)


def test_simulator_backward_writes_the_direction() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [(torch.randn(5, 3), torch.randn(5, 1)) for _ in range(2)]

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    sim = EF14(Identity()).simulator(2)
    losses = sim.backward(model, loss_fn, batches)
    assert losses.shape == (2,)
    expected = torch.autograd.grad(sum(loss_fn(model, b) for b in batches) / 2, list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_registry_entries() -> None:
    expected = {"ef14": (EF14, "1809.07599"), "ef21": (EF21, "2106.05203"), "econtrol": (EControl, "2311.05645")}
    assert set(expected) <= set(optimlab.available("communication"))
    for name, (cls, arxiv) in expected.items():
        info = optimlab.get(name)
        assert info.cls is cls and info.kind == "communication" and info.arxiv == arxiv
        assert info.defaults["ratio"] == 0.1 and info.defaults["compressor"] == "topk"
        assert arxiv in cls.__doc__ and "math::" in cls.__doc__


def test_server_direction_first_round_sets_h() -> None:
    state: dict = {}
    m = torch.ones(3)
    out = server_direction("ef21", state, m)
    assert torch.equal(out, m) and out is not m
