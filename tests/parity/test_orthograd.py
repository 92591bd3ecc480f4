"""⊥Grad / OrthoGrad (spec §11) against pytorch_optimizer.OrthoGrad ("PO"), the paper's Definition 7, and its
invariants.

PO always rescales (= our default ``rescale=True``, the official code); ``rescale=False`` (paper Definition 7,
projection only) has no PO flag, so it is checked against a direct computation instead.
"""

import pytest
import pytorch_optimizer as po
import torch

import optimlab
from optimlab.transforms.orthograd import orthogonalize

from .conftest import Problem, run_pair

LR, MOMENTUM = 1e-2, 0.9
TOL = 1e-12  # measured <= 1e-15; dropping the rescale or the projection moves this problem by >= 1e-1
PROBLEM = Problem()  # includes a (1,) tensor, whose gradient is always parallel to it (see the guard test)


def sgd(ps):
    return torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM)


@pytest.mark.parametrize("foreach", [None, True])  # PO's per-tensor and batched projections
def test_matches_pytorch_optimizer(foreach):
    peer = lambda ps: po.OrthoGrad(sgd(ps), foreach=foreach)
    assert run_pair(lambda ps: optimlab.OrthoGrad(sgd(ps)), peer, problem=PROBLEM) < TOL


class Definition7SGD:
    """Paper Def. 7 written directly: θ ← θ - η(∇L - (θᵀ∇L / θᵀθ) θ), per tensor, no rescale, no 1e-30."""

    def __init__(self, params):
        self.params = params

    @torch.no_grad()
    def step(self):
        for p in self.params:
            w, g = p.reshape(-1), p.grad.reshape(-1)
            p.sub_(LR * (g - (w @ g) / (w @ w) * w).view_as(p))


def test_no_rescale_is_paper_definition_7():
    ours = lambda ps: optimlab.OrthoGrad(torch.optim.SGD(ps, lr=LR), rescale=False)
    assert run_pair(ours, Definition7SGD) < TOL  # all shapes, the (1,) tensor included


@pytest.mark.parametrize("rescale", [True, False])
def test_orthogonal_and_norm_preserving(rescale):
    gen = torch.Generator().manual_seed(0)
    for shape in ((5, 3), (4,), (2, 3, 4)):  # not (1,): there g ∥ w, see the guard test below
        w, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
        (g_perp,) = orthogonalize([w], [g], rescale=rescale)
        assert abs((g_perp * w).sum().item()) <= 1e-12 * g.norm().item() * w.norm().item()
        if rescale:
            assert g_perp.norm().item() == pytest.approx(g.norm().item(), rel=1e-12)
        else:  # projection only: the norm shrinks by exactly the parallel part
            parallel = (g * w).sum() / w.norm()
            assert (g_perp.norm() ** 2).item() == pytest.approx((g.norm() ** 2 - parallel**2).item(), rel=1e-12)


@pytest.mark.parametrize("rescale", [True, False])
def test_zero_weights_leave_gradient_unchanged(rescale):
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(orthogonalize([torch.zeros_like(g)], [g], rescale=rescale)[0], g)


@pytest.mark.parametrize("rescale", [True, False])
def test_gradient_parallel_to_weights_gives_zero(rescale):
    # g ∥ w (always so for a 1-element tensor) leaves only rounding noise in g_perp; rescaling it to ||g|| would
    # step in an arbitrary direction (unguarded, w=[1e-3], g=[-1.37] gives +1.37: an ascent step). Spec §11
    # pitfall: guard it; PO zeroes g_perp when ||g_perp|| <= 4·eps·||g|| (ours: 4·eps·sqrt(n)·||g||).
    for w, g in (([1e-3], [-1.37]), ([0.7], [-1.3]), ([0.3, 0.1], [0.9, 0.3])):
        w, g = torch.tensor(w, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        assert torch.equal(orthogonalize([w], [g], rescale=rescale)[0], torch.zeros_like(g))


def test_ours_restores_grad_and_pytorch_optimizer_overwrites_it():
    for make, restores in ((lambda ps: optimlab.OrthoGrad(sgd(ps)), True), (lambda ps: po.OrthoGrad(sgd(ps)), False)):
        params = PROBLEM.init()
        grads = PROBLEM.grads(params, 0)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.grad for p in params]
        make(params).step()
        assert all(p.grad is b for p, b in zip(params, before))  # the same tensor objects in both
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)) is restores
