"""Layers and losses from the papers: StableMax, TrAct, WTA-CRS linear layers."""

from optimlab.nn.stablemax import (
    StableMaxCrossEntropyLoss,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)
from optimlab.nn.tract import TrAct, tract, tract_weight_grad
from optimlab.nn.wtacrs import (
    WTACRSLinear,
    load_wtacrs_rng_state,
    replace_linear_layers,
    wtacrs_example_ids,
    wtacrs_linear,
    wtacrs_rng_state,
)

__all__ = [
    "StableMaxCrossEntropyLoss",
    "TrAct",
    "WTACRSLinear",
    "load_wtacrs_rng_state",
    "log_stablemax",
    "replace_linear_layers",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
    "tract",
    "tract_weight_grad",
    "wtacrs_example_ids",
    "wtacrs_linear",
    "wtacrs_rng_state",
]
