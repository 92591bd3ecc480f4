"""Layers and losses from the papers: StableMax (more to come: WTA-CRS linear layers, TrAct)."""

from optimlab.nn.stablemax import (
    StableMaxCrossEntropyLoss,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)

__all__ = ["StableMaxCrossEntropyLoss", "log_stablemax", "stablemax", "stablemax_cross_entropy", "stablemax_s"]
