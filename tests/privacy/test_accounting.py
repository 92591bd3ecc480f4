"""The accountant layer against the Gaussian mechanism's closed form, its inverse, and its bad inputs."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch

from optimlab.privacy import (
    PrivacyAccountant,
    check_delta,
    default_delta,
    dicesgd_noise_inflation,
    epsilon,
    noise_multiplier_for,
)

# Opacus's default RDP orders (the spec: 1.1 ... 10.9 in steps of 0.1, then 12 ... 63)
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Full-batch Gaussian mechanism: RDP(α) = T α / (2σ²), converted as Opacus converts (Balle et al. 2020,
    Theorem 21), minimised over the orders."""
    return min(
        steps * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in ORDERS
    )


def mironov_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Mironov's (looser) RDP conversion ε = RDP(α) + log(1/δ)/(α − 1)."""
    return min(steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in ORDERS)


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 10), (5.0, 100), (10.0, 7)])
def test_full_batch_epsilon_is_the_gaussian_mechanism_closed_form(sigma, steps) -> None:
    delta = 1e-5
    got = epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta)
    assert got == pytest.approx(gaussian_epsilon(sigma, steps, delta), rel=1e-12)
    assert got <= mironov_epsilon(sigma, steps, delta)


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")  # one step at q = 0.01: a tiny epsilon
def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    eps = [epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=t, delta=1e-5) for t in (1, 10, 100, 1000, 5000)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps
    by_sigma = [epsilon(noise_multiplier=s, sample_rate=0.01, steps=500, delta=1e-5) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:])), by_sigma
    # subsampling amplifies privacy: at a fixed sigma and number of steps a smaller q spends less
    assert epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5) < epsilon(
        noise_multiplier=1.0, sample_rate=0.1, steps=100, delta=1e-5
    )
    assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=3, delta=1e-5) == math.inf


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_noise_multiplier_for_inverts_epsilon(target) -> None:
    q, steps, delta = 0.02, 400, 1e-5
    sigma = noise_multiplier_for(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    spent = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert target - 0.01 <= spent <= target
    # a little less noise overspends
    assert epsilon(noise_multiplier=sigma * 0.97, sample_rate=q, steps=steps, delta=delta) > spent


def test_accountant_tracks_steps_like_the_one_shot_epsilon() -> None:
    acc = PrivacyAccountant(delta=1e-4)
    assert acc.epsilon() == 0.0 and acc.steps == 0
    for _ in range(25):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    assert acc.history == [(1.1, 0.05, 25)]
    assert acc.epsilon() == pytest.approx(epsilon(noise_multiplier=1.1, sample_rate=0.05, steps=25, delta=1e-4))
    before = acc.epsilon()
    acc.step(noise_multiplier=2.0, sample_rate=0.05, steps=10)
    assert acc.steps == 35 and len(acc.history) == 2
    assert acc.epsilon() > before
    assert acc.epsilon(delta=1e-6) > acc.epsilon()

    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    resumed = PrivacyAccountant(delta=0.5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.history == acc.history and resumed.delta == acc.delta
    assert resumed.epsilon() == acc.epsilon()
    acc.step(noise_multiplier=0.0, sample_rate=0.05)
    assert acc.epsilon() == math.inf


def test_dicesgd_noise_inflation_is_the_official_factor() -> None:
    assert dicesgd_noise_inflation(0.0) == 1.0
    assert dicesgd_noise_inflation(1.0) == pytest.approx(math.sqrt(3))
    assert dicesgd_noise_inflation(4.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="Invalid error_clip_ratio"):
        dicesgd_noise_inflation(-0.5)


@pytest.mark.parametrize("delta", [1.0, 1.5, 0.0, -1e-5, math.nan])
def test_bad_delta_raises(delta) -> None:
    with pytest.raises(ValueError, match=r"Invalid delta.*0 < delta < 1"):
        epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=delta)
    with pytest.raises(ValueError, match="Invalid delta"):
        PrivacyAccountant(delta=delta)
    with pytest.raises(ValueError, match="Invalid delta"):
        check_delta(delta)
    with pytest.raises(ValueError, match="Invalid delta"):
        noise_multiplier_for(target_epsilon=1.0, delta=delta, sample_rate=0.1, steps=10)


def test_other_bad_inputs_raise() -> None:
    assert default_delta(1000) == 1e-3
    with pytest.raises(ValueError, match="Invalid num_samples"):
        default_delta(1)  # delta would be 1
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match="Invalid sample_rate"):
            epsilon(noise_multiplier=1.0, sample_rate=q, steps=1, delta=1e-5)
    with pytest.raises(ValueError, match="Invalid noise_multiplier"):
        epsilon(noise_multiplier=-1.0, sample_rate=0.1, steps=1, delta=1e-5)
    with pytest.raises(ValueError, match="Invalid steps"):
        epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=2.5, delta=1e-5)
    with pytest.raises(ValueError, match="Invalid target_epsilon"):
        noise_multiplier_for(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=1)


def test_without_opacus_the_package_imports_and_accounting_says_what_to_install() -> None:
    script = """
import sys
sys.modules["opacus"] = None  # as if it were not installed
import torch
import optimlab.privacy as privacy
p = torch.nn.Parameter(torch.zeros(3))
opt = privacy.DiceSGD([p], expected_batch_size=2.0)
opt.step([torch.ones(2, 3)])
try:
    privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5)
except ImportError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install optimlab[privacy]" in out.stdout
