"""AdaHessian (spec §5) against torch_optimizer.Adahessian ("TO", the official image-classification code line by
line) and pytorch_optimizer.AdaHessian ("PO"), step by step in float64 with the same Rademacher probes.

The peers draw their probes with ``torch.randint_like(p, ...)`` from the global generator, one call per parameter;
optimlab draws them from its own generator, in one flat sample (``rademacher_probes``). The test replaces
``torch.randint_like`` with a function that hands out, call by call, ``(z + 1) / 2`` for the probes ``z`` that
``rademacher_probes`` draws from a generator seeded like ours, so both peers see exactly optimlab's probes.

A Hessian needs a real graph, so the shared driver of ``conftest.py`` (gradients from a formula) does not apply:
each run here trains a small conv net (a 4-D kernel, a matrix, biases; no 3-D tensor, which TO silently drops)
on one fixed batch with ``loss.backward(create_graph=True)``.

TO = ours with the defaults (|Hz|, spatial average of 4-D kernels). PO takes neither the average nor the absolute
value (D = z ⊙ Hz, whose square is |Hz|²), so it is compared with ``spatial_average=False``; its decay is
decoupled by default (``weight_decouple=True``), which is the official (and our) decay.
"""

from __future__ import annotations

import pytest
import pytorch_optimizer as po
import torch
import torch_optimizer as to
from torch import nn

import optimlab
from optimlab.optim.adahessian import rademacher_probes

STEPS = 12
SEED = 11
TOL = 1e-12  # measured <= 8.5e-15 (float64 rounding); another probe or a doubled eps moves θ by >= 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only synchronise


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)


def trajectory(make_opt, monkeypatch=None, seed: int = SEED) -> list[torch.Tensor]:
    """Parameters (flattened) after every step; with ``monkeypatch``, the peer's probes are optimlab's."""
    net, (x, y) = model(), data()
    params = list(net.parameters())
    opt = make_opt(params)
    if monkeypatch is not None:
        generator, queue = torch.Generator().manual_seed(seed), []

        def randint_like(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if not queue:  # a new step: the probes of every parameter, drawn as optimlab draws them
                queue.extend(rademacher_probes([q.grad for q in params], generator))
            z = queue.pop(0)
            assert z.shape == p.shape
            return (z + 1) / 2

        monkeypatch.setattr(torch, "randint_like", randint_like)
    out = []
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward(create_graph=True)
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in params]))
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("hessian_power", [1.0, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torch_optimizer(monkeypatch, hessian_power: float, weight_decay: float) -> None:
    kw = dict(lr=0.1, hessian_power=hessian_power, weight_decay=weight_decay)
    ours = trajectory(lambda ps: optimlab.AdaHessian(ps, seed=SEED, **kw))
    peer = trajectory(lambda ps: to.Adahessian(ps, **kw), monkeypatch)
    assert max_diff(ours, peer) < TOL


@pytest.mark.parametrize("foreach", [None, False])  # PO's two code paths
@pytest.mark.parametrize("abs_before_avg", [True, False])  # equal without the spatial average
@pytest.mark.parametrize("hessian_power", [1.0, 0.5])
def test_matches_pytorch_optimizer(monkeypatch, hessian_power: float, abs_before_avg: bool, foreach) -> None:
    kw = dict(lr=0.1, hessian_power=hessian_power, weight_decay=0.01, eps=1e-4)
    ours = trajectory(
        lambda ps: optimlab.AdaHessian(ps, seed=SEED, spatial_average=False, abs_before_avg=abs_before_avg, **kw)
    )
    peer = trajectory(lambda ps: po.AdaHessian(ps, foreach=foreach, **kw), monkeypatch)
    assert max_diff(ours, peer) < TOL


def test_the_tolerance_sees_a_different_probe(monkeypatch) -> None:
    ours = trajectory(lambda ps: optimlab.AdaHessian(ps, lr=0.1, seed=SEED))
    peer = trajectory(lambda ps: to.Adahessian(ps, lr=0.1, hessian_power=1.0), monkeypatch, seed=SEED + 1)
    assert max_diff(ours, peer) > 1e-3


def test_the_tolerance_sees_a_doubled_eps(monkeypatch) -> None:
    ours = trajectory(lambda ps: optimlab.AdaHessian(ps, lr=0.1, seed=SEED))
    peer = trajectory(lambda ps: to.Adahessian(ps, lr=0.1, hessian_power=1.0, eps=2e-4), monkeypatch)
    assert max_diff(ours, peer) > 1e-3


def test_pytorch_optimizer_differs_by_the_spatial_average(monkeypatch) -> None:
    # the conv kernel is the only 4-D tensor: averaging it is what separates PO from the official code
    ours = trajectory(lambda ps: optimlab.AdaHessian(ps, lr=0.1, seed=SEED))
    peer = trajectory(lambda ps: po.AdaHessian(ps, lr=0.1, eps=1e-4), monkeypatch)
    assert max_diff(ours, peer) > 1e-3
