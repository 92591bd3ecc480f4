"""StableMax: the paper's closed form, Proposition 1, and the softmax collapse it avoids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimlab.nn import StableMaxCrossEntropyLoss, log_stablemax, stablemax, stablemax_cross_entropy, stablemax_s


def direct_stablemax(x: torch.Tensor) -> torch.Tensor:
    """s(x_i) / Σ_j s(x_j) evaluated literally in float64 (the official code's form)."""
    x = x.double()
    s = torch.where(x >= 0, x + 1, 1 / (1 - x + 1e-30))
    return s / s.sum(-1, keepdim=True)


def test_s_values_and_smoothness():
    x = torch.tensor([0.0, 1.0, -1.0, 3.0, -3.0], dtype=torch.float64, requires_grad=True)
    s = stablemax_s(x)
    assert s.tolist() == [1.0, 2.0, 0.5, 4.0, 0.25]
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert grad.tolist() == pytest.approx([1.0, 1.0, 0.25, 1.0, 1 / 16])  # s'(0±) = 1: C¹


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_matches_the_closed_form(scale):
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    torch.testing.assert_close(stablemax(x), direct_stablemax(x), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(log_stablemax(x), direct_stablemax(x).log(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(stablemax(x).sum(-1), torch.ones(64, dtype=torch.float64))


def test_proposition_1_softmax_of_g():
    x = torch.linspace(-50, 50, 101, dtype=torch.float64)
    g = torch.where(x >= 0, torch.log(1 + x.clamp(min=0)), -torch.log(1 - x.clamp(max=0)))
    torch.testing.assert_close(stablemax(x), torch.softmax(g, -1), rtol=1e-13, atol=0)


def test_equal_logits_are_uniform():
    assert stablemax(torch.zeros(2)).tolist() == [0.5, 0.5]


def test_loss_is_mean_negative_log_probability_and_reductions():
    logits = torch.randn(8, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (8,))
    per_example = -direct_stablemax(logits).log()[torch.arange(8), target]
    torch.testing.assert_close(stablemax_cross_entropy(logits, target), per_example.mean())
    torch.testing.assert_close(stablemax_cross_entropy(logits, target, reduction="sum"), per_example.sum())
    torch.testing.assert_close(StableMaxCrossEntropyLoss(reduction="none")(logits, target), per_example)


def test_gradient_finite_everywhere_including_x_equal_one():
    x = torch.tensor([[1.0, -1.0, 0.0, 1e30, -1e30]], requires_grad=True)
    stablemax_cross_entropy(x, torch.tensor([0])).backward()
    assert torch.isfinite(x.grad).all()


def test_no_softmax_collapse_in_float32():
    """Large logits: float32 softmax rounds the true class's probability to exactly 1, so its cross-entropy
    and gradient are exactly 0 and learning stops; StableMax's stay nonzero."""
    logits = torch.tensor([[1e4, 0.0, -5.0]], requires_grad=True)
    target = torch.tensor([0])
    F.cross_entropy(logits, target).backward()
    assert logits.grad.abs().max().item() == 0.0  # the collapse
    logits.grad = None
    loss = stablemax_cross_entropy(logits, target)
    loss.backward()
    assert loss.item() > 0 and logits.grad[0, 0].item() < 0  # still pushes the true logit up
    assert torch.isfinite(logits.grad).all()


def test_low_precision_is_computed_in_float32_and_dtype_option():
    x = torch.randn(4, 7).bfloat16()
    assert log_stablemax(x).dtype == torch.float32
    assert log_stablemax(x, dtype=torch.float64).dtype == torch.float64


def test_bad_input():
    with pytest.raises(ValueError, match="reduction"):
        StableMaxCrossEntropyLoss(reduction="avg")
    with pytest.raises(TypeError, match="floating-point"):
        stablemax(torch.arange(3))


def test_gradient_at_zero_logits_is_the_closed_form():
    """s'(0) = 1, so zero logits (a zero-initialised head) get the gradient p - onehot of a uniform p."""
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    stablemax_cross_entropy(x, torch.tensor([0, 2]), reduction="sum").backward()
    expected = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    expected[0, 0] -= 1
    expected[1, 2] -= 1
    torch.testing.assert_close(x.grad, expected, rtol=1e-14, atol=1e-15)
    # and everywhere, against the literal formula's gradient
    z = torch.randn(4, 5, dtype=torch.float64).mul(3).round().requires_grad_()  # integer values, zeros included
    ours = torch.autograd.grad(log_stablemax(z).sum(), z)[0]
    zz = z.detach().requires_grad_()
    reference = torch.autograd.grad(direct_stablemax(zz).log().sum(), zz)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_classes_along_dim_1_as_cross_entropy():
    logits = torch.randn(2, 4, 3, dtype=torch.float64)  # (N, C, d1)
    target = torch.randint(0, 4, (2, 3))
    per_position = torch.stack(
        [stablemax_cross_entropy(logits[:, :, j], target[:, j], reduction="none") for j in range(3)], dim=1
    )
    torch.testing.assert_close(stablemax_cross_entropy(logits, target, reduction="none"), per_position)
    single = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(stablemax_cross_entropy(single, torch.tensor(2)), -direct_stablemax(single).log()[2])
    with pytest.raises(TypeError, match="integer class indices"):
        stablemax_cross_entropy(logits, torch.rand(2, 4, 3))
