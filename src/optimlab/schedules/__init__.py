"""Learning-rate schedules and rules for choosing a learning rate.

- :mod:`~optimlab.schedules.linear`: linear decay with warm-up (:func:`linear_decay`, :class:`LinearDecayLR`);
- :mod:`~optimlab.schedules.refined`: the refined schedule from a previous run's gradient norms (:func:`refine`,
  :class:`RefinedLR`, :func:`save_schedule`, :func:`load_schedule`);
- :mod:`~optimlab.schedules.rules`: batch-size scaling (:func:`scale_lr_for_batch`, :func:`batch_scaling_rule`)
  and the Step Law (:func:`step_law`).

The schedulers are ordinary :class:`torch.optim.lr_scheduler.LRScheduler` subclasses: they multiply each param
group's initial learning rate (the peak) by the schedule's multiplier at the current step.
"""

from __future__ import annotations

from optimlab.schedules.linear import LinearDecayLR, linear_decay
from optimlab.schedules.refined import (
    RefinedLR,
    Refinement,
    clean_norms,
    closed_form_schedule,
    load_schedule,
    median_filter,
    refine,
    refine_details,
    resample_linear,
    save_schedule,
    smooth_norms,
)
from optimlab.schedules.rules import (
    STEP_LAW_COEFFICIENTS,
    STEP_LAW_FIT_RANGE,
    StepLawResult,
    batch_scaling_rule,
    is_sgd_like,
    scale_lr_for_batch,
    step_law,
)

__all__ = [
    "STEP_LAW_COEFFICIENTS",
    "STEP_LAW_FIT_RANGE",
    "LinearDecayLR",
    "RefinedLR",
    "Refinement",
    "StepLawResult",
    "batch_scaling_rule",
    "clean_norms",
    "closed_form_schedule",
    "is_sgd_like",
    "linear_decay",
    "load_schedule",
    "median_filter",
    "refine",
    "refine_details",
    "resample_linear",
    "save_schedule",
    "scale_lr_for_batch",
    "smooth_norms",
    "step_law",
]
