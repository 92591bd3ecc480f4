"""Claims: a paper's headline result, written as a predicate before the run and judged on the run's records.

A claim compares a *candidate* optimizer with a *baseline* on one workload (or, with ``baseline_workload``, the
baseline on a variant of it, e.g. the same task with another loss), using only the "final" trials (the
chosen hyperparameters rerun over several seeds). A trial is *finished* when its status is "ok" or "diverged";
"error" trials are broken runs, not results, and are left out. Candidate and baseline trials are *paired by seed*
(the same seed means the same initialisation and data order), and only seeds finished by both are used.

Two rule kinds (``RULE_KINDS``), each with an aggregate comparison and the same comparison seed by seed:

``speedup`` (metric ``steps_to_target``, ``grad_evals_to_target`` or ``seconds_to_target``)
    A trial's *time* is its recorded time-to-target if it reached the target within the claim's step ``budget``
    (``steps_to_target <= budget``), else ∞ (never reached, reached too late, or diverged first).
    Aggregate: R = median(candidate times) / median(baseline times); seed i: r_i = t_candidate,i / t_baseline,i.
    The comparison holds when the ratio is ≤ ``ratio`` (0.5: "in at most half the steps"; 0: "reaches the
    target where the baseline never does"). ∞/∞ is undefined (neither reached the target: nothing to compare),
    x/∞ = 0 and ∞/x = ∞ for finite x.

``better`` (metric ``final_val``, ``best_val`` or ``test.<name>``)
    A trial's *value* is the metric oriented so that higher is better (negated when lower is better); a diverged
    trial has the worst value, −∞. ``final_val`` and ``best_val`` are read from the curve's evaluations at steps
    ≤ ``budget`` when the run was longer; ``test.<name>`` is the end-of-run test value (``record.test[name]``).
    Aggregate: D = mean(candidate values) − mean(baseline values); seed i: d_i = candidate_i − baseline_i.
    The comparison holds when the difference is > ``margin`` (in the metric's units): 0 asks for strictly
    better, a positive margin for a clear improvement, a negative one encodes "matches or beats" within |margin|.

Verdict, with n paired finished seeds and k = ⌈agree · n⌉ (``agree`` defaults to 2/3: 2 of 3, 4 of 5 seeds):

- ✓ (holds): the aggregate comparison holds and it holds on at least k seeds on their own;
- ✗ (fails): the aggregate comparison fails and it fails on at least k seeds on their own;
- inconclusive: the workload, candidate or baseline has no finished final trials; n < ``min_seeds``; the run
  measured another workload metric than the claim's ``workload_metric``; a value is missing; the aggregate is
  undefined (neither optimizer reached the target, or both diverged); or the aggregate and the seeds disagree,
  which is what "within noise" means here (one outlier seed decides the mean or the median).
"""

from __future__ import annotations

import math
import statistics
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from optimlab.bench.records import TrialRecord

__all__ = [
    "RULE_KINDS",
    "TIME_METRICS",
    "Claim",
    "ClaimResult",
    "ClaimsFileError",
    "Rule",
    "Verdict",
    "default_claims_text",
    "describe_rule",
    "evaluate_claim",
    "evaluate_claims",
    "final_trials",
    "format_number",
    "load_claims",
    "parse_claims",
    "time_ratio",
    "time_to_target",
]

TIME_METRICS = ("steps_to_target", "grad_evals_to_target", "seconds_to_target")
VALUE_METRICS = ("final_val", "best_val")  # and "test.<name>"
FINISHED = ("ok", "diverged")
DEFAULT_AGREE = 2 / 3

# (workload, optimizer) -> {seed: finished final trial}
FinalIndex = Mapping[tuple[str, str], Mapping[int, TrialRecord]]


class ClaimsFileError(ValueError):
    """A claims file that does not parse or holds a malformed claim."""


class Verdict(str, Enum):
    HOLDS = "holds"
    FAILS = "fails"
    INCONCLUSIVE = "inconclusive"

    @property
    def symbol(self) -> str:
        return {"holds": "✓", "fails": "✗", "inconclusive": "inconclusive"}[self.value]


@dataclass(frozen=True)
class Rule:
    """How a claim is decided: ``kind`` (one of ``RULE_KINDS``) and its threshold (``ratio`` or ``margin``)."""

    kind: str
    ratio: float | None = None  # speedup: candidate ≤ ratio × baseline
    margin: float | None = None  # better: candidate − baseline > margin
    agree: float = DEFAULT_AGREE  # fraction of paired seeds that must agree with the aggregate

    def seeds_needed(self, n: int) -> int:
        return max(1, math.ceil(self.agree * n - 1e-9))


@dataclass(frozen=True)
class Claim:
    """One paper's headline claim as a predicate on one workload (see the module docstring for the rules)."""

    id: str
    paper: str
    arxiv: str
    source: str  # where the paper says it, paraphrased
    statement: str  # the predicate in words
    workload: str
    metric: str
    candidate: str
    baseline: str
    budget: int  # steps: the claim is judged on the first `budget` steps of each trial
    min_seeds: int
    rule: Rule
    workload_metric: str | None = None  # the workload metric the margin is written in ("accuracy", ...)
    baseline_workload: str | None = None  # the baseline's own workload (a variant of ``workload``), if it differs

    @property
    def baseline_on(self) -> str:
        return self.baseline_workload or self.workload


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    verdict: Verdict
    measured: str  # the measured figure in words
    statistic: float | None = None  # R (speedup) or D (better); None when not computed
    seeds: int = 0  # paired finished seeds
    seeds_holding: int = 0
    seeds_failing: int = 0
    reason: str = ""  # why inconclusive


# ----------------------------------------------------------------------------------------------- per-trial numbers


def final_trials(records: Iterable[TrialRecord]) -> dict[tuple[str, str], dict[int, TrialRecord]]:
    """Finished final-phase trials by (workload, optimizer) and seed (a later record of the same seed wins)."""
    index: dict[tuple[str, str], dict[int, TrialRecord]] = {}
    for record in records:
        if record.phase == "final" and record.status in FINISHED:
            index.setdefault((record.workload, record.optimizer), {})[record.seed] = record
    return index


def time_to_target(record: TrialRecord, metric: str = "steps_to_target", budget: int | None = None) -> float:
    """The trial's time-to-target in ``metric``'s unit, ∞ when not reached (within ``budget`` steps, if given)."""
    steps = record.steps_to_target
    value = getattr(record, metric)
    if value is None or steps is None or (budget is not None and steps > budget):
        return math.inf
    return float(value)


def time_ratio(a: float, b: float) -> float:
    """a / b for times in [0, ∞]: ∞/∞ is undefined (nan), x/0 is ∞ for x > 0 and 1 for x = 0."""
    if math.isinf(a) and math.isinf(b):
        return math.nan
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def _higher_is_better(metric: str, record: TrialRecord) -> bool | None:
    """Orientation of a value metric: the workload's for its own metric, lower for losses, else unknown."""
    name = metric.removeprefix("test.")
    if metric in VALUE_METRICS or name == record.metric:
        return record.higher_is_better
    if name == "loss":
        return False
    return None


def _raw_value(record: TrialRecord, metric: str, budget: int | None, higher: bool) -> float | None:
    if metric.startswith("test."):
        return record.test.get(metric.removeprefix("test."))
    steps, values = record.curve.get("step") or [], record.curve.get("val_metric") or []
    if budget is None or record.steps <= budget or not steps:
        return record.final_val if metric == "final_val" else record.best_val
    seen = [_float(v) for s, v in zip(steps, values) if s <= budget]
    seen = [v for v in seen if not math.isnan(v)]
    if not seen:
        return None
    if metric == "final_val":
        return seen[-1]
    return max(seen) if higher else min(seen)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def oriented_value(record: TrialRecord, metric: str, budget: int | None = None) -> float:
    """The trial's value of a value metric, negated if lower is better; −∞ if diverged, nan if unknown."""
    if record.status == "diverged":
        return -math.inf
    higher = _higher_is_better(metric, record)
    if higher is None:
        return math.nan
    value = _float(_raw_value(record, metric, budget, higher))
    return value if higher else -value


# -------------------------------------------------------------------------------------------------- the two rules


@dataclass(frozen=True)
class _Kind:
    """One rule kind: how a trial becomes a number, how the seeds aggregate, and how two numbers compare."""

    trial_value: Callable[[TrialRecord, Claim], float]
    aggregate: Callable[[list[float]], float]
    compare: Callable[[float, float], float]  # (candidate, baseline) -> statistic
    holds: Callable[[float, Rule], bool]  # statistic -> holds (never called with nan)
    describe: Callable[[Claim], str]
    aggregate_name: str


def _difference(a: float, b: float) -> float:
    """a − b for oriented values in [−∞, ∞): −∞ − (−∞) is undefined (nan)."""
    if math.isinf(a) and math.isinf(b):
        return math.nan
    return a - b


def _where(claim: Claim) -> str:
    if claim.baseline_on == claim.workload:
        return f"on {claim.workload}"
    return f"on {claim.workload} (the baseline on {claim.baseline_on})"


def _describe_speedup(claim: Claim) -> str:
    if claim.rule.ratio == 0:
        return (
            f"median {claim.metric}({claim.candidate}) finite and median {claim.metric}({claim.baseline}) = ∞ "
            f"{_where(claim)}, not reached within {claim.budget} steps = ∞"
        )
    return (
        f"median {claim.metric}({claim.candidate}) ≤ {claim.rule.ratio:g} × median {claim.metric}"
        f"({claim.baseline}) {_where(claim)}, not reached within {claim.budget} steps = ∞"
    )


def _describe_better(claim: Claim) -> str:
    margin = claim.rule.margin
    if margin > 0:
        words = f"better than {claim.baseline}'s by more than {margin:g}"
    elif margin == 0:
        words = f"strictly better than {claim.baseline}'s"
    else:
        words = f"better than {claim.baseline}'s or worse by less than {-margin:g}"
    return f"mean {claim.metric}({claim.candidate}) {words} {_where(claim)} (diverged = worst)"


KINDS: dict[str, _Kind] = {
    "speedup": _Kind(
        trial_value=lambda record, claim: time_to_target(record, claim.metric, claim.budget),
        aggregate=statistics.median,
        compare=time_ratio,
        holds=lambda r, rule: r <= rule.ratio,
        describe=_describe_speedup,
        aggregate_name="median",
    ),
    "better": _Kind(
        trial_value=lambda record, claim: oriented_value(record, claim.metric, claim.budget),
        aggregate=statistics.fmean,
        compare=_difference,
        holds=lambda d, rule: d > rule.margin,
        describe=_describe_better,
        aggregate_name="mean",
    ),
}
RULE_KINDS = tuple(KINDS)


def describe_rule(claim: Claim) -> str:
    """The rule of a claim in words, with the seed requirements."""
    return (
        f"{KINDS[claim.rule.kind].describe(claim)}; ≥ {claim.min_seeds} paired seeds, "
        f"the aggregate and ≥ {claim.rule.agree:.0%} of the seeds agreeing (else inconclusive)"
    )


def format_number(x: float | None) -> str:
    """4 significant digits; ∞ for infinities and — for missing or undefined values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}"


def _inconclusive(claim: Claim, reason: str) -> ClaimResult:
    return ClaimResult(claim, Verdict.INCONCLUSIVE, measured=reason, reason=reason)


def _decide(aggregate: bool | None, per_seed: list[bool | None], needed: int) -> Verdict:
    holding, failing = per_seed.count(True), per_seed.count(False)
    if aggregate is True and holding >= needed:
        return Verdict.HOLDS
    if aggregate is False and failing >= needed:
        return Verdict.FAILS
    return Verdict.INCONCLUSIVE


def evaluate_claim(claim: Claim, index: FinalIndex) -> ClaimResult:
    """Judge one claim on finished final trials indexed by :func:`final_trials`."""
    kind = KINDS[claim.rule.kind]
    candidate, baseline = index.get((claim.workload, claim.candidate)), index.get((claim.baseline_on, claim.baseline))
    for workload in dict.fromkeys((claim.workload, claim.baseline_on)):
        if not any(w == workload for w, _ in index):
            return _inconclusive(claim, f"workload {workload} is not in the results")
    for name, trials, workload in ((claim.candidate, candidate, claim.workload), (claim.baseline, baseline, claim.baseline_on)):
        if not trials:
            return _inconclusive(claim, f"no finished final trials of {name} on {workload}")
    metrics = {next(iter(trials.values())).metric for trials in (candidate, baseline)}
    if len(metrics) > 1:
        return _inconclusive(claim, f"candidate and baseline measured different metrics ({', '.join(sorted(metrics))})")
    metric = metrics.pop()
    if claim.workload_metric is not None and metric != claim.workload_metric:
        return _inconclusive(claim, f"the claim is written for {claim.workload_metric}, the run measured {metric}")
    seeds = sorted(set(candidate) & set(baseline))
    if len(seeds) < claim.min_seeds:
        return _inconclusive(claim, f"{len(seeds)} paired finished seeds, the claim needs {claim.min_seeds}")
    c_values = [kind.trial_value(candidate[s], claim) for s in seeds]
    b_values = [kind.trial_value(baseline[s], claim) for s in seeds]
    if any(math.isnan(v) for v in c_values + b_values):
        return _inconclusive(claim, f"{claim.metric} is missing or of unknown direction in some trials")
    c_agg, b_agg = kind.aggregate(c_values), kind.aggregate(b_values)
    statistic = kind.compare(c_agg, b_agg)
    per_seed = [kind.compare(c, b) for c, b in zip(c_values, b_values)]
    aggregate = None if math.isnan(statistic) else kind.holds(statistic, claim.rule)
    seed_holds = [None if math.isnan(x) else kind.holds(x, claim.rule) for x in per_seed]
    verdict = _decide(aggregate, seed_holds, claim.rule.seeds_needed(len(seeds)))
    sign = -1.0 if claim.rule.kind == "better" and not _higher_is_better(claim.metric, candidate[seeds[0]]) else 1.0
    measured = _measured_text(claim, kind, (c_agg, b_agg), statistic, sign, seed_holds)
    reason = "" if verdict is not Verdict.INCONCLUSIVE else _noise_reason(aggregate, seed_holds, claim, kind)
    return ClaimResult(
        claim,
        verdict,
        measured,
        statistic=None if math.isnan(statistic) else statistic,
        seeds=len(seeds),
        seeds_holding=seed_holds.count(True),
        seeds_failing=seed_holds.count(False),
        reason=reason,
    )


def _measured_text(
    claim: Claim,
    kind: _Kind,
    aggregates: tuple[float, float],
    statistic: float,
    sign: float,
    seed_holds: list[bool | None],
) -> str:
    """The aggregates in the metric's own units, the statistic, and how many seeds hold on their own."""
    c_agg, b_agg = (sign * x for x in aggregates)
    if claim.rule.kind == "speedup":
        outcome = f"ratio {format_number(statistic)} (needs ≤ {claim.rule.ratio:g})"
    else:
        outcome = f"advantage {format_number(statistic)} (needs > {claim.rule.margin:g})"
    return (
        f"{kind.aggregate_name} {claim.metric}: {claim.candidate} {format_number(c_agg)}, "
        f"{claim.baseline} {format_number(b_agg)} → {outcome}; holds on {seed_holds.count(True)} of "
        f"{len(seed_holds)} seeds"
    )


def _noise_reason(aggregate: bool | None, seed_holds: list[bool | None], claim: Claim, kind: _Kind) -> str:
    if aggregate is None:
        if claim.rule.kind == "speedup":
            return "neither optimizer's median reached the target within the budget"
        return "both optimizers diverged"
    agreeing = seed_holds.count(aggregate)
    return (
        f"within noise: the {kind.aggregate_name} says the claim {'holds' if aggregate else 'fails'}, but only "
        f"{agreeing} of {len(seed_holds)} seeds agree (needs {claim.rule.seeds_needed(len(seed_holds))})"
    )


def evaluate_claims(claims: Iterable[Claim], records: Iterable[TrialRecord]) -> list[ClaimResult]:
    """Judge every claim on the records (only finished final trials count)."""
    index = final_trials(records)
    return [evaluate_claim(claim, index) for claim in claims]


# ------------------------------------------------------------------------------------------------ the claims file

_REQUIRED = {
    "id": str,
    "paper": str,
    "arxiv": str,
    "source": str,
    "statement": str,
    "workload": str,
    "metric": str,
    "candidate": str,
    "baseline": str,
    "budget": int,
    "min_seeds": int,
    "rule": dict,
}
_OPTIONAL = {"workload_metric": str, "baseline_workload": str}
_RULE_PARAMETERS = {"speedup": "ratio", "better": "margin"}


def default_claims_text() -> str:
    """The claims file shipped with the package (``optimlab/bench/claims.toml``)."""
    return resources.files("optimlab.bench").joinpath("claims.toml").read_text(encoding="utf-8")


def load_claims(path: str | Path | None = None) -> list[Claim]:
    """Claims from a TOML file (the shipped one when ``path`` is None).

    Raises ClaimsFileError (a ValueError) naming the claim and the problem when a claim is malformed.
    """
    if path is None:
        return parse_claims(default_claims_text(), "claims.toml (shipped)")
    return parse_claims(Path(path).read_text(encoding="utf-8"), str(path))


def parse_claims(text: str, source: str = "<claims>") -> list[Claim]:
    """Claims from TOML text: an array of ``[[claim]]`` tables (format in ``claims.toml``'s header)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ClaimsFileError(f"{source}: not valid TOML ({err})") from err
    unknown = set(data) - {"claim"}
    if unknown:
        raise ClaimsFileError(f"{source}: unknown top-level keys {sorted(unknown)} (expected [[claim]] tables)")
    claims = [_parse_claim(entry, f"{source}: claim #{i + 1}") for i, entry in enumerate(data.get("claim", []))]
    ids = [claim.id for claim in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ClaimsFileError(f"{source}: duplicate claim ids {duplicates}")
    return claims


def _check_keys(entry: Mapping[str, Any], required: Mapping[str, type], optional: Mapping[str, type], where: str):
    missing = sorted(set(required) - set(entry))
    unknown = sorted(set(entry) - set(required) - set(optional))
    if missing or unknown:
        raise ClaimsFileError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    for key, value in entry.items():
        expected = {**required, **optional}[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ClaimsFileError(f"{where}: {key} must be {expected.__name__}, got {value!r}")


def _parse_rule(entry: Mapping[str, Any], metric: str, where: str) -> Rule:
    kind = entry.get("kind")
    if kind not in RULE_KINDS:
        raise ClaimsFileError(f"{where}: rule kind {kind!r} is not one of {RULE_KINDS}")
    parameter = _RULE_PARAMETERS[kind]
    _check_keys(entry, {"kind": str, parameter: float}, {"agree": float}, f"{where}: rule")
    metric_ok = metric in TIME_METRICS if kind == "speedup" else (metric in VALUE_METRICS or metric.startswith("test."))
    if not metric_ok:
        raise ClaimsFileError(f"{where}: metric {metric!r} does not fit rule kind {kind!r}")
    rule = Rule(kind=kind, **{parameter: float(entry[parameter])}, agree=float(entry.get("agree", DEFAULT_AGREE)))
    if kind == "speedup" and not rule.ratio >= 0:
        raise ClaimsFileError(f"{where}: ratio must be ≥ 0")
    if not 0 < rule.agree <= 1:
        raise ClaimsFileError(f"{where}: agree must be in (0, 1]")
    return rule


def _parse_claim(entry: Mapping[str, Any], where: str) -> Claim:
    if not isinstance(entry, dict):
        raise ClaimsFileError(f"{where}: expected a table")
    where = f"{where} ({entry.get('id', '?')})"
    _check_keys(entry, _REQUIRED, _OPTIONAL, where)
    if entry["budget"] < 1 or entry["min_seeds"] < 1:
        raise ClaimsFileError(f"{where}: budget and min_seeds must be ≥ 1")
    rule = _parse_rule(entry["rule"], entry["metric"], where)
    return Claim(**{**entry, "rule": rule})
