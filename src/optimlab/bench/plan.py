"""Which trials a suite needs, and how the tuning phase picks each optimizer's learning rate.

Fair tuning: every optimizer gets the same number of tuning trials, a log-spaced grid over its registry's
suggested learning-rate range (the papers' advice: Lion's range sits lower than AdamW's, Adan's higher), all
other hyperparameters at their defaults. Tuning runs seed 0 and is scored on validation; the chosen learning
rate then runs on ``seeds`` fresh seeds (1, 2, …), the ones the report aggregates, and the test split is only
reported. The score of a tuning trial (lower is better): reaching the target, sooner is better; otherwise the
final validation metric; a diverged or failed trial is worst.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from optimlab.bench.records import TrialRecord, trial_key
from optimlab.bench.runner import lr_range
from optimlab.bench.workloads import WORKLOADS

__all__ = ["Suite", "SUITES", "TrialSpec", "grid", "score", "pending", "planned_count"]

TUNE_SEED = 0


@dataclass(frozen=True)
class Suite:
    name: str
    workloads: tuple[str, ...]
    optimizers: tuple[str, ...]
    grid_points: int  # tuning trials per (workload, optimizer)
    seeds: int  # final seeds per (workload, optimizer)

    def with_options(self, **changes: Any) -> Suite:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        workloads=tuple(name for name, w in WORKLOADS.items() if w.quick),
        optimizers=("torch:AdamW", "adan", "exadam", "diffgrad", "lion"),
        grid_points=6,
        seeds=3,
    ),
    "full": Suite(
        "full",
        workloads=tuple(WORKLOADS),
        optimizers=("torch:AdamW", "adan", "exadam", "diffgrad", "lion", "orthograd(torch:AdamW)"),
        grid_points=8,
        seeds=3,
    ),
}


@dataclass(frozen=True)
class TrialSpec:
    workload: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    phase: str

    @property
    def key(self) -> str:
        return trial_key(self.workload, self.optimizer, self.hparams, self.seed)


def grid(optimizer: str, points: int) -> list[float]:
    """``points`` log-spaced learning rates across the optimizer's range, rounded to 3 significant digits."""
    low, high = lr_range(optimizer)
    if points == 1:
        return [float(f"{math.sqrt(low * high):.3g}")]
    step = (math.log10(high) - math.log10(low)) / (points - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.3g}") for i in range(points)]


def score(record: TrialRecord) -> float:
    """Lower is better: steps to target when reached, else 1e9 plus how far the final metric is from it."""
    if record.status != "ok" or record.final_val is None or not math.isfinite(record.final_val):
        return math.inf
    if record.steps_to_target is not None:
        return float(record.steps_to_target)
    gap = record.target - record.final_val if record.higher_is_better else record.final_val - record.target
    return 1e9 + max(gap, 0.0)


def _tuning(suite: Suite, workload: str, optimizer: str) -> list[TrialSpec]:
    return [
        TrialSpec(workload, optimizer, {"lr": lr}, TUNE_SEED, "tune") for lr in grid(optimizer, suite.grid_points)
    ]


def pending(suite: Suite, done: Mapping[str, TrialRecord]) -> tuple[list[TrialSpec], bool]:
    """Trials that can run now, in order, and whether the whole suite is finished."""
    ready: list[TrialSpec] = []
    finished = True
    for workload in suite.workloads:
        for optimizer in suite.optimizers:
            tuning = _tuning(suite, workload, optimizer)
            missing = [t for t in tuning if t.key not in done]
            if missing:
                ready += missing
                finished = False
                continue
            best = min(tuning, key=lambda t: (score(done[t.key]), t.hparams["lr"]))
            finals = [
                TrialSpec(workload, optimizer, best.hparams, seed, "final") for seed in range(1, suite.seeds + 1)
            ]
            todo = [t for t in finals if t.key not in done]
            ready += todo
            finished = finished and not todo
    return ready, finished


def planned_count(suite: Suite) -> int:
    return len(suite.workloads) * len(suite.optimizers) * (suite.grid_points + suite.seeds)


def describe(suite: Suite) -> Iterable[str]:
    yield f"suite {suite.name}: {len(suite.workloads)} workloads x {len(suite.optimizers)} optimizers"
    yield f"  {suite.grid_points} tuning trials + {suite.seeds} seeds each = {planned_count(suite)} trials"
