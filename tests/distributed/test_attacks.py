"""Byzantine attacks: each one's definition, which rows change, randomness and errors."""

from __future__ import annotations

import pytest
import torch

from optimlab.distributed.attacks import (
    ATTACKS,
    alie_z,
    byzantine_rows,
    large_noise,
    little_is_enough,
    sign_flip,
)


def honest(n=8, d=1000, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 1.0


def test_byzantine_rows():
    assert byzantine_rows(6, 2) == [4, 5]
    assert byzantine_rows(6, 0) == []
    assert byzantine_rows(6, [0, 3]) == [0, 3]
    for bad in ([0, 0], [6], [-1], 7):
        with pytest.raises(ValueError):
            byzantine_rows(6, bad)


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_only_byzantine_rows_change_and_input_is_kept(attack):
    grads = honest()
    before = grads.clone()
    out = attack(grads, [1, 6], generator=torch.Generator().manual_seed(0))
    assert torch.equal(grads, before)
    keep = [0, 2, 3, 4, 5, 7]
    assert torch.equal(out[keep], grads[keep])
    assert not torch.equal(out[[1, 6]], grads[[1, 6]])
    assert torch.equal(attack(grads, 0, generator=torch.Generator()), grads)


def test_sign_flip_definition():
    grads = honest()
    out = sign_flip(grads, 3, scale=4.0)
    torch.testing.assert_close(out[5:], -4.0 * grads[5:])
    torch.testing.assert_close(sign_flip(grads, 3)[5:], -grads[5:])
    with pytest.raises(ValueError, match="Invalid scale"):
        sign_flip(grads, 1, scale=-1.0)


def test_large_noise_definition():
    grads = honest(n=6, d=20000)
    out = large_noise(grads, 2, std=50.0, generator=torch.Generator().manual_seed(1))
    noise = out[4:]
    assert abs(noise.mean().item()) < 50.0 * 5 / (2 * 20000) ** 0.5
    assert abs(noise.std().item() / 50.0 - 1) < 0.02
    again = large_noise(grads, 2, std=50.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the generator decides the noise
    with pytest.raises(ValueError, match="Invalid std"):
        large_noise(grads, 1, std=-1.0)


def test_alie_z_is_the_papers_z_max():
    # n = 10, f = 3: s = floor(6) - 3 = 3 honest workers to win over, z = Phi^-1(7/10)
    assert alie_z(10, 3) == pytest.approx(0.5244005127080407)
    # the paper's example n = 50, f = 24: s = 2, z = Phi^-1(48/50)
    assert alie_z(50, 24) == pytest.approx(1.7506860712521692)
    with pytest.raises(ValueError, match="Invalid f"):
        alie_z(10, 6)


def test_little_is_enough_definition():
    grads = honest(n=10)
    out = little_is_enough(grads, 3)
    std, mu = grads.std(0), grads.mean(0)
    expected = mu - alie_z(10, 3) * std
    for row in out[7:]:
        torch.testing.assert_close(row, expected)
    torch.testing.assert_close(little_is_enough(grads, [0], z=2.0)[0], mu - 2.0 * std)
    # within a standard deviation per coordinate: the point of the attack
    assert ((out[9] - mu).abs() <= std).all()
    with pytest.raises(ValueError, match="n >= 2"):
        little_is_enough(grads[:1], 1)


def test_attacks_follow_dtype():
    grads = honest().double()
    for attack in ATTACKS.values():
        assert attack(grads, 2, generator=torch.Generator()).dtype == torch.float64
