"""Training across workers: compressed communication with error feedback, 1-bit Adam, robust aggregation.

The methods: error feedback for compressed gradients (:class:`EF14`, :class:`EF21`, :class:`EControl`, with the
compressors :class:`TopK`, :class:`RandK`, :class:`ScaledSign`), :class:`OneBitAdam`, and robust aggregation
(:class:`Flag`, :class:`Mean`, :class:`CoordinateMedian`, :class:`TrimmedMean`, :class:`Krum`, with the attacks in
:mod:`optimlab.distributed.attacks`).

Every method runs two ways over one functional core: on real ``torch.distributed`` ranks (DDP communication
hooks, or collectives inside the optimizer), and in a single-process n-worker simulator
(:mod:`optimlab.distributed.simulator`) for tests and the bench. Bytes sent are counted by one wrapper around
the collectives (:mod:`optimlab.distributed.comm`).
"""

from optimlab.distributed import attacks
from optimlab.distributed.aggregators import (
    Aggregator,
    CoordinateMedian,
    Krum,
    Mean,
    RobustHookState,
    TrimmedMean,
    robust_hook,
)
from optimlab.distributed.comm import Communicator, allreduce_hook
from optimlab.distributed.compressors import Identity, RandK, ScaledSign, TopK
from optimlab.distributed.error_feedback import EF14, EF21, CompressedSGD, EControl, Simulator
from optimlab.distributed.flag import Flag
from optimlab.distributed.hooks import ErrorFeedbackHook, error_feedback_hook
from optimlab.distributed.launch import spawn
from optimlab.distributed.onebit_adam import OneBitAdam, onebit_adam_hook, register_onebit_adam

__all__ = [
    "Aggregator",
    "Communicator",
    "CompressedSGD",
    "CoordinateMedian",
    "EControl",
    "EF14",
    "EF21",
    "ErrorFeedbackHook",
    "Flag",
    "Identity",
    "Krum",
    "Mean",
    "OneBitAdam",
    "RandK",
    "RobustHookState",
    "ScaledSign",
    "Simulator",
    "TopK",
    "TrimmedMean",
    "allreduce_hook",
    "attacks",
    "error_feedback_hook",
    "onebit_adam_hook",
    "register_onebit_adam",
    "robust_hook",
    "spawn",
]
