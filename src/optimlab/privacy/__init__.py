"""Differentially private training: DP-SGD with per-sample clipping, DiceSGD, Poisson sampling and Opacus's
RDP accountant (``pip install optimlab[privacy]`` for the accountant; the optimizers and the sampler need only
torch)."""

from optimlab.privacy.accounting import (
    PrivacyAccountant,
    check_delta,
    default_delta,
    dicesgd_noise_inflation,
    epsilon,
    noise_multiplier_for,
)
from optimlab.privacy.dice_sgd import DiceSGD, dice_sgd_
from optimlab.privacy.dp_sgd import (
    DPSGD,
    PrivateOptimizer,
    PrivateTrainingResult,
    clip_factors,
    dp_sgd_,
    train_private,
)
from optimlab.privacy.sampling import PoissonBatchSampler, poisson_loader

__all__ = [
    "DPSGD",
    "DiceSGD",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "PrivateOptimizer",
    "PrivateTrainingResult",
    "check_delta",
    "clip_factors",
    "default_delta",
    "dice_sgd_",
    "dicesgd_noise_inflation",
    "dp_sgd_",
    "epsilon",
    "noise_multiplier_for",
    "poisson_loader",
    "train_private",
]
