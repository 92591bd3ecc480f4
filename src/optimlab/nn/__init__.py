"""Layers and losses from the papers: StableMax, TrAct, WTA-CRS linear layers."""

from optimlab.nn.stablemax import (
    StableMaxCrossEntropyLoss,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)
from optimlab.nn.tract import TrAct, tract, tract_weight_grad

__all__ = [
    "StableMaxCrossEntropyLoss",
    "TrAct",
    "log_stablemax",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
    "tract",
    "tract_weight_grad",
]
