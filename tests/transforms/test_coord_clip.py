"""Coordinate-wise clipping (Pan & Li, arXiv 2306.00204): the operator against a concatenate-and-sort reference
in float64, its per-coordinate invariants, ties, and the CoordClip wrapper's one threshold over all groups."""

from __future__ import annotations

import math

import pytest
import torch

import optimlab
from optimlab import CoordClip, OrthoGrad
from optimlab.transforms.coord_clip import clip_top_coordinates, top_coordinates_threshold

SHAPES = ((7, 5), (11,), (), (3, 2, 4))


def random_tensors(seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # heavy-tailed magnitudes, as the gradients the paper studies
    return [
        torch.randn(s, generator=gen, dtype=torch.float64) * torch.rand(s, generator=gen, dtype=torch.float64) ** -2
        for s in shapes
    ]


def reference_threshold(tensors: list[torch.Tensor], fraction: float) -> float:
    magnitudes = sorted(torch.cat([t.reshape(-1) for t in tensors]).abs().tolist(), reverse=True)
    rank = int(fraction * len(magnitudes))
    return 0.0 if rank >= len(magnitudes) else magnitudes[rank]


FRACTIONS = (0.01, 0.1, 0.25, 0.5, 0.9, 0.99)


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_clip_invariants_per_coordinate(fraction: float, scale: float) -> None:
    xs = random_tensors(seed=int(fraction * 100))
    tau = reference_threshold(xs, fraction)
    assert top_coordinates_threshold(xs, fraction).item() == tau
    bound = scale * tau
    clipped = clip_top_coordinates(xs, fraction, threshold_scale=scale)
    flat, flat_clipped = torch.cat([x.reshape(-1) for x in xs]), torch.cat([c.reshape(-1) for c in clipped])
    below = flat.abs() < bound
    assert torch.equal(flat_clipped[below], flat[below])  # untouched
    assert torch.equal(flat_clipped[~below], flat[~below].sign() * bound)  # ±s·τ with their own sign
    assert flat_clipped.abs().max().item() == min(bound, flat.abs().max().item())
    assert torch.linalg.vector_norm(flat_clipped) <= torch.linalg.vector_norm(flat)
    assert int((flat.abs() >= tau).sum()) >= int(fraction * flat.numel()) + 1
    assert [c.shape for c in clipped] == [x.shape for x in xs]


def test_fraction_zero_is_the_identity_and_one_is_all_zero() -> None:
    xs = random_tensors()
    same = clip_top_coordinates(xs, 0.0, threshold_scale=0.5)  # the scale does not apply at c = 0 (official)
    assert all(a is b for a, b in zip(same, xs))
    zeros = clip_top_coordinates(xs, 1.0)
    assert all(not z.any() for z in zeros)
    assert top_coordinates_threshold(xs, 1.0).item() == 0.0


def test_ties_at_the_threshold_are_treated_alike() -> None:
    # magnitude 2 appears five times around the threshold index; with c = 0.3, d = 10 the threshold is the
    # 4th largest magnitude, which is 2
    x = torch.tensor([5.0, -2.0, 2.0, 2.0, -2.0, 2.0, 1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    assert top_coordinates_threshold([x], 0.3).item() == 2.0
    (clipped,) = clip_top_coordinates([x], 0.3)
    assert torch.equal(
        clipped, torch.tensor([2.0, -2.0, 2.0, 2.0, -2.0, 2.0, 1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    )
    (halved,) = clip_top_coordinates([x], 0.3, threshold_scale=0.5)
    assert torch.equal(
        halved, torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    )
    # all magnitudes equal: every fraction below 1 keeps the tensor, whichever entries "the top" would be
    flat = torch.tensor([3.0, -3.0] * 8, dtype=torch.float64)
    for fraction in (0.1, 0.5, 0.9):
        assert torch.equal(clip_top_coordinates([flat], fraction)[0], flat)


def test_threshold_is_global_across_tensors() -> None:
    small, large = torch.full((10,), 0.1, dtype=torch.float64), torch.arange(1.0, 11.0, dtype=torch.float64)
    clipped_small, clipped_large = clip_top_coordinates([small, large], 0.05)  # d = 20: τ = 2nd largest = 9
    assert torch.equal(clipped_small, small)  # per tensor, these would be clipped to their own max (a no-op too)
    assert torch.equal(clipped_large, large.clamp(max=9.0))
    per_tensor = clip_top_coordinates([large], 0.05)[0]  # d = 10: τ = the largest = 10, nothing clipped
    assert torch.equal(per_tensor, large)


def test_mixed_dtypes_share_one_threshold() -> None:
    a = torch.tensor([4.0, -1.0, 0.5], dtype=torch.bfloat16)
    b = torch.tensor([3.0, -8.0, 2.0], dtype=torch.float32)
    ca, cb = clip_top_coordinates([a, b], 0.34)  # d = 6, index 2: τ = 3
    assert ca.dtype == torch.bfloat16 and cb.dtype == torch.float32
    assert ca.tolist() == [3.0, -1.0, 0.5] and cb.tolist() == [3.0, -3.0, 2.0]


def test_nan_stays_nan_in_its_coordinate() -> None:
    x = torch.tensor([1.0, math.nan, -3.0, 0.5, 2.0, 0.1, 0.2, 0.3, 0.4, 0.6], dtype=torch.float64)
    (clipped,) = clip_top_coordinates([x], 0.0001)  # τ = the largest magnitude: NaN, which sorts above every number
    assert torch.isnan(clipped).all()
    # d = 20, τ = the 7th largest magnitude (NaN ranks first), a number: only the NaN entry is NaN
    first, second = clip_top_coordinates([x.nan_to_num(0.0), x], 0.3)
    assert torch.isfinite(first).all() and torch.isnan(second[1]) and torch.isfinite(second[[0, 2, 3]]).all()


def test_empty_and_invalid_inputs() -> None:
    empty = torch.empty(0, 3)
    assert clip_top_coordinates([empty], 0.5)[0] is empty
    with pytest.raises(ValueError, match=r"Invalid fraction: 1.5; expected a number with 0 <= fraction <= 1"):
        clip_top_coordinates([torch.ones(2)], 1.5)
    with pytest.raises(ValueError, match=r"Invalid threshold_scale"):
        clip_top_coordinates([torch.ones(2)], 0.5, threshold_scale=0.0)
    with pytest.raises(TypeError, match="sparse"):
        clip_top_coordinates([torch.ones(2).to_sparse()], 0.5)
    with pytest.raises(TypeError, match="complex"):
        clip_top_coordinates([torch.ones(2, dtype=torch.complex64)], 0.0)
    with pytest.raises(ValueError, match=r"Invalid fraction"):
        CoordClip(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), fraction=-0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        CoordClip([torch.nn.Parameter(torch.ones(2))], fraction=0.1)


def test_wrapper_clips_over_all_param_groups_and_restores_grads() -> None:
    grads = random_tensors(seed=3)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    frozen = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))  # no gradient: not part of the threshold
    inner = torch.optim.SGD([{"params": params[:2] + [frozen]}, {"params": params[2:], "lr": 0.5}], lr=1.0)
    opt = CoordClip(inner, fraction=0.2)
    for p, g in zip(params, grads):
        p.grad = g
    copies = [g.clone() for g in grads]
    opt.step()
    assert all(p.grad is g for p, g in zip(params, grads)) and all(map(torch.equal, grads, copies))
    tau = reference_threshold(grads, 0.2)
    expected = [g.clamp(-tau, tau) for g in grads]
    for p, e, lr in zip(params, expected, (1.0, 1.0, 0.5, 0.5)):
        torch.testing.assert_close(p.detach(), -lr * e, rtol=0, atol=0)  # zeros minus lr·clip: exact
    assert not frozen.any()


def test_wrapper_composes_with_torch_adam_and_orthograd() -> None:
    """CoordClip(Adam) is Adam on the clipped gradients; wrappers nest (the inner one transforms first)."""
    gen = torch.Generator().manual_seed(5)
    a = [torch.nn.Parameter(torch.randn(6, 3, generator=gen, dtype=torch.float64)) for _ in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    wrapped = CoordClip(torch.optim.Adam(a, lr=1e-2), fraction=0.3)
    manual = torch.optim.Adam(b, lr=1e-2)
    for _ in range(4):
        grads = [torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in a]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        wrapped.step()
        for p, g in zip(b, clip_top_coordinates(grads, 0.3)):
            p.grad = g
        manual.step()
    assert all(map(torch.equal, a, b))

    nested = CoordClip(OrthoGrad(torch.optim.SGD(a, lr=0.1)), fraction=0.3)
    nested.step()  # runs, and restores the gradients through both layers
    assert "CoordClip(fraction=0.3, threshold_scale=1.0, optimizer=OrthoGrad(" in repr(nested)


def test_create_builds_the_wrapper_by_name() -> None:
    model = torch.nn.Linear(3, 2)
    opt = optimlab.create("coordclip", model, inner="sgd", lr=0.1, fraction=0.1)
    assert isinstance(opt, CoordClip) and opt.options["fraction"] == 0.1
    assert isinstance(opt.optimizer, torch.optim.SGD)


def test_wrappers_compose_by_nesting_like_a_chain() -> None:
    """OrthoGrad(CoordClip(SGD)): the outer transform runs first, the inner one sees its output (optax's chain),
    and the caller's gradients come back untouched; the bench builds the same from its spec."""
    from optimlab.bench.runner import resolve_optimizer
    from optimlab.transforms.orthograd import orthogonalize

    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in start]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    chained = resolve_optimizer("orthograd(coordclip[fraction=0.2](torch:SGD))")(params, lr=0.1)
    assert isinstance(chained, OrthoGrad) and isinstance(chained.optimizer, CoordClip)
    chained.step()
    expected_update = clip_top_coordinates(orthogonalize(start, grads), 0.2)
    for p, w, u, g in zip(params, start, expected_update, grads):
        torch.testing.assert_close(p.detach(), w - 0.1 * u, rtol=1e-14, atol=1e-15)
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fraction", [0.0, 1e-4, 0.1, 0.5, 0.9, 0.99999])
def test_the_radix_threshold_equals_a_full_sort(dtype, fraction) -> None:
    """16/32-bit thresholds come from a radix select on the bit patterns: exact, ties and zeros included."""
    gen = torch.Generator().manual_seed(11)
    values = torch.cat(
        [
            torch.randn(5000, generator=gen) * 10.0 ** torch.randint(-20, 20, (5000,), generator=gen),
            torch.zeros(300),  # exact zeros
            torch.full((400,), 0.75),  # a tie spanning many ranks
            torch.tensor([float("inf"), -float("inf"), 1e-45]),  # the extremes and a subnormal
        ]
    ).to(dtype)
    tensors = list(values[torch.randperm(values.numel(), generator=gen)].split([1000, 2000, 2703]))
    d = values.numel()
    rank = int(fraction * d)
    expected = values.abs().float().sort(descending=True).values[rank].to(dtype)
    threshold = top_coordinates_threshold(tensors, fraction)
    assert threshold.dtype == dtype and torch.equal(threshold, expected)
