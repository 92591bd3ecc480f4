"""Which trials a suite needs, and how the tuning phase picks each optimizer's learning rate.

Fair tuning: on a workload every optimizer gets the same number of tuning trials over its registry's suggested
learning-rate range (the papers' advice: Lion's range sits lower than AdamW's, Adan's higher), all other
hyperparameters at their defaults. The trials are a log-spaced grid (``search="grid"``) or the suggestions of
Optuna's TPE sampler (``search="tpe"``): the k-th suggestion is a function of the first k - 1 results alone (a
seeded sampler replayed over them), so a resumed or shared study asks for the same trials, one at a time per
(workload, optimizer). Tuning runs seed 0 and is scored on validation; the chosen learning
rate then runs on ``seeds`` fresh seeds (1, 2, …), the ones the report aggregates, and the test split is only
reported. The score of a tuning trial (lower is better): reaching the target, sooner is better; otherwise the
final validation metric; a diverged or failed trial is worst.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from optimlab.bench.records import TrialRecord, trial_key
from optimlab.bench.runner import lr_range
from optimlab.bench.specs import linear_source, parse_spec
from optimlab.bench.workloads import WORKLOADS

__all__ = ["Suite", "SUITES", "TrialSpec", "grid", "score", "pending", "planned_count"]

TUNE_SEED = 0


@dataclass(frozen=True)
class Suite:
    name: str
    workloads: tuple[str, ...]
    optimizers: tuple[str, ...]
    tuning_trials: int  # per (workload, optimizer)
    seeds: int  # final seeds per (workload, optimizer)
    search: Literal["grid", "tpe"] = "grid"
    tuning_trials_for: Mapping[str, int] = field(default_factory=dict)  # fewer for the costly workloads
    optimizers_for: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # a workload's own list

    def __post_init__(self) -> None:
        if self.search not in ("grid", "tpe"):
            raise ValueError(f"search must be 'grid' or 'tpe', got {self.search!r}")
        for workload, optimizer in self.pairs():
            if parse_spec(optimizer).schedule != "refined":
                continue
            if self.search != "grid":
                raise ValueError(f"{optimizer}: a refined schedule is computed from the linear-decay trial at the "
                                 "same learning rate, which only grid search guarantees; use search='grid'")
            if linear_source(optimizer) not in self.optimizers_of(workload):
                raise ValueError(f"{optimizer} on {workload} is refined from {linear_source(optimizer)}, which "
                                 "the suite does not run there: add it")

    def trials(self, workload: str) -> int:
        return self.tuning_trials_for.get(workload, self.tuning_trials)

    def optimizers_of(self, workload: str) -> tuple[str, ...]:
        return self.optimizers_for.get(workload, self.optimizers)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (workload, optimizer) the suite runs, in order."""
        return [(w, o) for w in self.workloads for o in self.optimizers_of(w)]

    def with_options(self, **changes: Any) -> Suite:
        changes = {k: v for k, v in changes.items() if v is not None}
        if "tuning_trials" in changes:  # an explicit count applies to every workload
            changes["tuning_trials_for"] = {}
        if "optimizers" in changes:  # an explicit list applies to every workload
            changes["optimizers_for"] = {}
        return replace(self, **changes)


SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        workloads=tuple(name for name, w in WORKLOADS.items() if w.quick),
        optimizers=("torch:AdamW", "adan", "exadam", "diffgrad", "lion"),
        tuning_trials=6,
        seeds=3,
    ),
    "full": Suite(
        "full",
        workloads=tuple(name for name, w in WORKLOADS.items() if w.variant_of is None and w.workers == 1),
        optimizers=("torch:AdamW", "adan", "exadam", "diffgrad", "lion", "orthograd(torch:AdamW)"),
        tuning_trials=8,
        seeds=3,
        # a transformer trial takes ~30-45 s at 2 threads (the others ~1 s): 3 learning rates each keeps the
        # suite inside its hour
        tuning_trials_for={"charlm": 3, "modadd-grokking": 3},
    ),
    # training aids: the refined schedule against the linear decay it is computed from, and a 2 x 2 of loss
    # (softmax, StableMax) and optimizer (AdamW, ⊥AdamW) without weight decay on the grokking task
    "aids": Suite(
        "aids",
        workloads=("mnist1d-cnn", "charlm", "modadd-grokking", "modadd-grokking-stablemax"),
        optimizers=("torch:AdamW@linear", "torch:AdamW@refined"),
        # 6 learning rates everywhere: the full suite's 3 for the transformers (a decade and a half apart) missed
        # the rates at which the refined schedule and the grokking set-ups work, in a first run of this suite
        tuning_trials=6,
        seeds=3,
        optimizers_for={
            "modadd-grokking": ("torch:AdamW[weight_decay=0]", "orthograd(torch:AdamW[weight_decay=0])"),
            "modadd-grokking-stablemax": ("torch:AdamW[weight_decay=0]", "orthograd(torch:AdamW[weight_decay=0])"),
        },
    ),
    # curvature and memory-efficient methods (issue 7) beside AdamW: AdaHessian and M-FAC on the CNN, FRUGAL on the
    # language model, and the two layers (TrAct, WTA-CRS) as workload variants trained by AdamW, each paired with
    # AdamW on the unmodified workload; every pair gets the same number of tuning trials
    "curvature-memory": Suite(
        "curvature-memory",
        workloads=("mnist1d-cnn", "mnist1d-cnn-tract", "charlm", "charlm-wtacrs"),
        optimizers=("torch:AdamW",),
        tuning_trials=6,
        seeds=3,
        # 5 learning rates per transformer pair: a charlm trial takes ~40-60 s, and 5 log-spaced points put one
        # at 3.16e-3 in both AdamW's range and FRUGAL's, where charlm trains well
        tuning_trials_for={"charlm": 5, "charlm-wtacrs": 5},
        optimizers_for={
            "mnist1d-cnn": ("torch:AdamW", "adahessian", "mfac"),
            # the projection named in both FRUGAL specs (blockwise is the default): the two lines read side by side
            "charlm": ("torch:AdamW", "frugal[proj_type='block']", "frugal[proj_type='svd']"),
        },
    ),
    # training across workers (issue 8), in the single-process simulator: error feedback on heterogeneous least
    # squares (Top-K 10 %, plain SGD steps; uncompressed SGD as the reference), robust aggregation under a
    # sign-flip attack, and 1-bit Adam against Adam on the CNN and the char-LM transformer spread over 4 workers
    "distributed": Suite(
        "distributed",
        workloads=("lsq-hetero", "digits-mlp-byzantine", "mnist1d-cnn-4workers", "charlm-4workers"),
        optimizers=("torch:SGD",),
        tuning_trials=6,
        seeds=3,
        tuning_trials_for={"charlm-4workers": 5},  # ~1 min a trial: 5 learning rates, as the other charlm suites
        optimizers_for={
            "lsq-hetero": ("econtrol[eta=0.1]", "ef21", "ef14", "compressed_sgd", "torch:SGD"),
            "digits-mlp-byzantine": ("flag", "mean", "coordinate_median", "trimmed_mean[f=3]", "krum[f=3]"),
            "mnist1d-cnn-4workers": ("onebit_adam", "torch:Adam"),
            "charlm-4workers": ("onebit_adam", "torch:Adam"),
        },
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


def _tuning(suite: Suite, workload: str, optimizer: str, done: Mapping[str, TrialRecord]) -> tuple[list[TrialSpec], list[TrialSpec], bool]:
    """(finished tuning trials, tuning trials that can run now, whether tuning is complete) of one (workload,
    optimizer)."""

    def trial(lr: float) -> TrialSpec:
        return TrialSpec(workload, optimizer, {"lr": lr}, TUNE_SEED, "tune")

    n = suite.trials(workload)
    if suite.search == "grid":
        specs = [trial(lr) for lr in grid(optimizer, n)]
        tuned = [t for t in specs if t.key in done]
        # a refined trial waits for the linear-decay trial it is computed from
        runnable = [t for t in specs if t.key not in done and _source_done(t, done)]
        return tuned, runnable, len(tuned) == len(specs)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    low, high = lr_range(optimizer)
    sampler = optuna.samplers.TPESampler(seed=zlib.crc32(f"{workload}|{optimizer}".encode()), n_startup_trials=max(2, n // 3))
    study = optuna.create_study(sampler=sampler)  # in memory: replayed from the finished trials on every call
    lr_space = {"lr": optuna.distributions.FloatDistribution(low, high, log=True)}
    finished: list[TrialSpec] = []
    for _ in range(n):
        suggestion = study.ask(lr_space)
        spec = trial(float(f"{suggestion.params['lr']:.3g}"))
        if spec.key not in done:
            return finished, [spec], False
        study.tell(suggestion, min(score(done[spec.key]), 1e300))  # TPE ranks the values; inf is not one
        finished.append(spec)
    return finished, [], True


def pending(suite: Suite, done: Mapping[str, TrialRecord]) -> tuple[list[TrialSpec], bool]:
    """Trials that can run now, in order, and whether the whole suite is finished."""
    ready: list[TrialSpec] = []
    finished = True
    for workload, optimizer in suite.pairs():
        tuned, runnable, complete = _tuning(suite, workload, optimizer, done)
        if not complete:
            ready += runnable
            finished = False
            continue
        best = min(tuned, key=lambda t: (score(done[t.key]), t.hparams["lr"]))
        finals = [TrialSpec(workload, optimizer, best.hparams, seed, "final") for seed in range(1, suite.seeds + 1)]
        todo = [t for t in finals if t.key not in done]
        ready += todo
        finished = finished and not todo
    return ready, finished


def _source_done(trial: TrialSpec, done: Mapping[str, TrialRecord]) -> bool:
    source = source_key(trial)
    return source is None or source in done


def source_key(trial: TrialSpec) -> str | None:
    """The key of the linear-decay trial a refined trial's schedule is computed from: the same workload, spec
    (scheduled ``linear``) and learning rate, on the tuning seed; None for the other schedules."""
    if parse_spec(trial.optimizer).schedule != "refined":
        return None
    return trial_key(trial.workload, linear_source(trial.optimizer), {"lr": trial.hparams["lr"]}, TUNE_SEED)


def planned_count(suite: Suite) -> int:
    return sum(suite.trials(w) + suite.seeds for w, _ in suite.pairs())


def describe(suite: Suite) -> Iterable[str]:
    yield f"suite {suite.name}: {len(suite.workloads)} workloads, {len(suite.pairs())} (workload, optimizer) pairs"
    counts = sorted({suite.trials(w) for w in suite.workloads})
    tuning = " or ".join(map(str, counts))
    yield f"  {tuning} tuning trials ({suite.search}) + {suite.seeds} seeds each = {planned_count(suite)} trials"
