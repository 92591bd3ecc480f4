"""Claims: the shipped file parses, each rule kind decides both ways, and the verdicts follow the numbers.

``trial`` (the record factory) and ``seeds`` are shared with test_report.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

import pytest

import optimlab
from optimlab.bench.claims import (
    RULE_KINDS,
    Claim,
    ClaimsFileError,
    Rule,
    Verdict,
    describe_rule,
    evaluate_claims,
    load_claims,
    parse_claims,
    time_ratio,
)
from optimlab.bench.records import CURVE_COLUMNS, TrialRecord
from optimlab.bench.runner import resolve_optimizer
from optimlab.bench.specs import parse_spec
from optimlab.bench.workloads import get_workload

EVAL_EVERY = 100
SECONDS_PER_STEP = 0.01


def trial(
    optimizer: str = "cand",
    seed: int = 1,
    values: Sequence[float] = (0.5, 0.9),
    *,
    workload: str = "w",
    phase: str = "final",
    lr: float = 1e-3,
    target: float = 0.8,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    test: float | None = None,
) -> TrialRecord:
    """A record as the runner writes it: validation ``values`` at steps 100, 200, …; the time-to-target fields
    come from the first evaluation that reaches ``target``; a non-finite value makes the trial diverged there."""
    steps = [EVAL_EVERY * (i + 1) for i in range(len(values))]
    finite = [v for v in values if math.isfinite(v)]

    def reached(v: float) -> bool:
        return v >= target if higher_is_better else v <= target

    hit = next((s for s, v in zip(steps, values) if math.isfinite(v) and reached(v)), None)
    curve = {c: [0.0] * len(steps) for c in CURVE_COLUMNS}
    curve.update(step=steps, grad_evals=steps, seconds=[s * SECONDS_PER_STEP for s in steps], val_metric=list(values))
    return TrialRecord(
        workload=workload,
        optimizer=optimizer,
        hparams={"lr": lr},
        seed=seed,
        phase=phase,
        status="ok" if len(finite) == len(values) else "diverged",
        metric=metric,
        higher_is_better=higher_is_better,
        target=target,
        curve=curve,
        steps=steps[-1],
        grad_evals=steps[-1],
        seconds=steps[-1] * SECONDS_PER_STEP,
        steps_to_target=hit,
        grad_evals_to_target=hit,
        seconds_to_target=None if hit is None else hit * SECONDS_PER_STEP,
        final_val=values[-1],
        best_val=(max if higher_is_better else min)(finite) if finite else None,
        test={metric: values[-1] if test is None else test},
        env={"torch": "2.x", "started": f"2025-01-0{seed % 9 + 1}T00:00:00+00:00"},
    )


def reaching_at(step: int | None, evals: int = 10) -> list[float]:
    """Validation accuracies that first reach the 0.8 target at ``step`` (never when None)."""
    return [0.9 if step is not None and EVAL_EVERY * (i + 1) >= step else 0.5 for i in range(evals)]


def seeds(optimizer: str, per_seed: Sequence, *, by: str = "steps", **kw) -> list[TrialRecord]:
    """Final trials on seeds 1, 2, …: ``per_seed`` holds steps-to-target (by="steps") or final values (by="final")."""
    if by == "steps":
        return [trial(optimizer, s, reaching_at(x), **kw) for s, x in enumerate(per_seed, start=1)]
    return [trial(optimizer, s, [0.5, x], **kw) for s, x in enumerate(per_seed, start=1)]


def claim(kind: str = "speedup", **changes) -> Claim:
    """A claim on workload "w": candidate "cand" vs baseline "base", 3 seeds, budget 1000 steps."""
    metric, rule = (
        ("steps_to_target", Rule("speedup", ratio=0.5))
        if kind == "speedup"
        else ("final_val", Rule("better", margin=0.0))
    )
    base = Claim(
        id=f"test-{kind}",
        paper="A paper",
        arxiv="0000.00000",
        source="abstract, paraphrased",
        statement="cand beats base",
        workload="w",
        metric=metric,
        candidate="cand",
        baseline="base",
        budget=1000,
        min_seeds=3,
        rule=rule,
    )
    return replace(base, **changes)


def verdict(c: Claim, records: Sequence[TrialRecord]) -> Verdict:
    return evaluate_claims([c], records)[0].verdict


# --------------------------------------------------------------------------------------------------- the claims file


def test_shipped_claims_parse_and_reference_known_rules_and_optimizers() -> None:
    claims = load_claims()
    assert len(claims) >= 4
    assert {c.candidate for c in claims} >= {"adan", "lion", "exadam", "diffgrad"}
    for c in claims:
        assert c.rule.kind in RULE_KINDS
        assert re.fullmatch(r"\d{4}\.\d{4,5}", c.arxiv), c.id
        assert c.min_seeds >= 3 and c.budget > 0 and c.statement and c.source
        data_parallel = get_workload(c.workload).workers > 1
        for spec in (c.candidate, c.baseline):
            name = parse_spec(spec).innermost.name
            if name in optimlab.available("communication") + optimlab.available("aggregator"):
                assert data_parallel, f"{c.id}: {name} runs on a data-parallel workload"  # through the simulator
            else:
                resolve_optimizer(spec)  # a spec the runner can build
        # Adam(W) is the baseline, except where the paper's own baseline is a distributed method (the mean
        # aggregate, compressed SGD without error feedback)
        baseline = parse_spec(c.baseline).innermost.name
        assert baseline in ("torch:AdamW", "torch:Adam") or (data_parallel and baseline in optimlab.REGISTRY), c.id


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ('rule = { kind = "faster", ratio = 0.5 }', "rule kind"),
        ('rule = { kind = "speedup", margin = 0.5 }', "missing keys"),
        ('rule = { kind = "speedup", ratio = 0.5, agree = 1.5 }', "agree"),
        ('rule = { kind = "better", margin = 0.0 }', "does not fit"),  # steps_to_target with a value rule
        ('rule = { kind = "speedup", ratio = 0.5 }\ntypo = 1', "unknown keys"),
        ('rule = { kind = "speedup", ratio = 0.5 }\n[[claim]]\nid = "x"', "missing keys"),
        ("rule = 'speedup'", "rule must be dict"),
    ],
)
def test_malformed_claims_are_rejected_with_the_reason(broken: str, message: str) -> None:
    text = """[[claim]]
id = "x"
paper = "p"
arxiv = "2208.06677"
source = "s"
statement = "s"
workload = "w"
metric = "steps_to_target"
candidate = "adan"
baseline = "torch:AdamW"
budget = 100
min_seeds = 3
"""
    assert len(parse_claims(text + 'rule = { kind = "speedup", ratio = 0.5 }')) == 1
    with pytest.raises(ClaimsFileError, match=message):
        parse_claims(text + broken)


def test_duplicate_ids_are_rejected() -> None:
    entry = load_claims()[0]
    text = f'[[claim]]\nid = "{entry.id}"\n'
    with pytest.raises(ClaimsFileError):
        parse_claims(text + text)


# --------------------------------------------------------------------------------------------------- rule: speedup


def test_speedup_holds_when_the_median_ratio_is_within_the_bound() -> None:
    records = seeds("cand", [200, 200, 300]) + seeds("base", [500, 500, 600])
    result = evaluate_claims([claim()], records)[0]
    assert result.verdict is Verdict.HOLDS
    assert result.statistic == pytest.approx(200 / 500)
    assert (result.seeds, result.seeds_holding) == (3, 3)


def test_speedup_fails_when_the_candidate_is_not_fast_enough() -> None:
    records = seeds("cand", [400, 400, 300]) + seeds("base", [500, 500, 600])
    assert verdict(claim(), records) is Verdict.FAILS


def test_speedup_is_inconclusive_when_the_seeds_disagree_with_the_median() -> None:
    records = seeds("cand", [100, 200, 600]) + seeds("base", [400, 500, 500])  # per seed: 0.25, 0.4, 1.2
    unanimous = claim(rule=Rule("speedup", ratio=0.5, agree=1.0))
    result = evaluate_claims([unanimous], records)[0]
    assert result.verdict is Verdict.INCONCLUSIVE and "within noise" in result.reason
    assert verdict(claim(), records) is Verdict.HOLDS  # 2 of 3 seeds agree: enough by default


def test_speedup_counts_unreached_as_infinite() -> None:
    baseline_never = seeds("cand", [300, 300, 300]) + seeds("base", [None, None, 900])
    assert verdict(claim(), baseline_never) is Verdict.HOLDS  # median 300 vs ∞
    neither = seeds("cand", [None] * 3) + seeds("base", [None] * 3)
    result = evaluate_claims([claim()], neither)[0]
    assert result.verdict is Verdict.INCONCLUSIVE and "neither" in result.reason


def test_ratio_zero_means_the_candidate_reaches_where_the_baseline_never_does() -> None:
    reaches_only = claim(rule=Rule("speedup", ratio=0.0))
    assert verdict(reaches_only, seeds("cand", [300, 300, 900]) + seeds("base", [None] * 3)) is Verdict.HOLDS
    assert verdict(reaches_only, seeds("cand", [300] * 3) + seeds("base", [2000, 900, 900])) is Verdict.FAILS
    assert verdict(reaches_only, seeds("cand", [None] * 3) + seeds("base", [900] * 3)) is Verdict.FAILS


def test_the_baseline_may_run_on_a_variant_workload() -> None:
    across = claim(baseline_workload="w-variant")
    records = seeds("cand", [200, 200, 300]) + seeds("base", [500, 500, 600], workload="w-variant")
    result = evaluate_claims([across], records)[0]
    assert result.verdict is Verdict.HOLDS and "w-variant" in describe_rule(across)
    # the baseline's own workload is the variant: its trials on "w" are not used
    unpaired = seeds("cand", [200] * 3) + seeds("base", [500] * 3) + seeds("other", [500] * 3, workload="w-variant")
    assert "no finished final trials of base on w-variant" in evaluate_claims([across], unpaired)[0].reason
    other_metric = seeds("cand", [200] * 3) + seeds("base", [500] * 3, workload="w-variant", metric="loss")
    assert "different metrics" in evaluate_claims([across], other_metric)[0].reason


def test_speedup_ignores_targets_reached_after_the_budget() -> None:
    records = seeds("cand", [200, 200, 200]) + seeds("base", [600, 600, 600])
    assert verdict(claim(), records) is Verdict.HOLDS
    assert verdict(claim(budget=500), records) is Verdict.HOLDS  # baseline unreached within 500 steps: ∞
    late = seeds("cand", [700, 700, 700]) + seeds("base", [600, 600, 600])
    assert verdict(claim(budget=650, rule=Rule("speedup", ratio=2.0)), late) is Verdict.FAILS


def test_time_ratio_edge_cases() -> None:
    assert time_ratio(1.0, math.inf) == 0.0
    assert time_ratio(math.inf, 1.0) == math.inf
    assert math.isnan(time_ratio(math.inf, math.inf))
    assert time_ratio(0.0, 0.0) == 1.0 and time_ratio(1.0, 0.0) == math.inf


# ---------------------------------------------------------------------------------------------------- rule: better


def test_better_holds_and_fails_on_the_mean_and_the_seeds() -> None:
    c = claim("better")
    assert (
        verdict(c, seeds("cand", [0.93, 0.94, 0.95], by="final") + seeds("base", [0.90, 0.91, 0.92], by="final"))
        is Verdict.HOLDS
    )
    assert (
        verdict(c, seeds("cand", [0.90, 0.91, 0.92], by="final") + seeds("base", [0.93, 0.94, 0.95], by="final"))
        is Verdict.FAILS
    )


def test_better_with_a_negative_margin_means_matches_or_beats() -> None:
    slightly_worse = seeds("cand", [0.918, 0.918, 0.918], by="final") + seeds("base", [0.92, 0.92, 0.92], by="final")
    assert verdict(claim("better", rule=Rule("better", margin=-0.005)), slightly_worse) is Verdict.HOLDS
    assert verdict(claim("better", rule=Rule("better", margin=0.0)), slightly_worse) is Verdict.FAILS
    equal = seeds("cand", [0.92] * 3, by="final") + seeds("base", [0.92] * 3, by="final")
    assert verdict(claim("better", rule=Rule("better", margin=0.0)), equal) is Verdict.FAILS  # "better" is strict


def test_better_is_inconclusive_when_one_seed_carries_the_mean() -> None:
    records = seeds("cand", [0.90, 0.90, 0.99], by="final") + seeds("base", [0.92, 0.92, 0.80], by="final")
    result = evaluate_claims([claim("better")], records)[0]
    assert result.statistic > 0  # the mean says better …
    assert result.verdict is Verdict.INCONCLUSIVE  # … but 2 of 3 seeds say worse


def test_better_orients_lower_is_better_metrics() -> None:
    kw = {"metric": "loss", "higher_is_better": False, "target": 0.1}
    lower = seeds("cand", [0.2, 0.2, 0.2], by="final", **kw) + seeds("base", [0.3, 0.3, 0.3], by="final", **kw)
    result = evaluate_claims([claim("better")], lower)[0]
    assert result.verdict is Verdict.HOLDS and result.statistic == pytest.approx(0.1)
    assert "cand 0.2, base 0.3" in result.measured  # shown in the metric's own units


def test_better_reads_test_metrics_and_the_value_at_the_budget() -> None:
    records = [trial("cand", s, [0.85, 0.95, 0.5], test=0.7) for s in (1, 2, 3)]
    records += [trial("base", s, [0.9, 0.9, 0.9], test=0.8) for s in (1, 2, 3)]
    assert verdict(claim("better"), records) is Verdict.FAILS  # final_val at step 300: 0.5 < 0.9
    assert verdict(claim("better", budget=200), records) is Verdict.HOLDS  # the last value by step 200: 0.95
    assert verdict(claim("better", budget=100), records) is Verdict.FAILS  # by step 100: 0.85
    assert verdict(claim("better", metric="best_val", budget=200), records) is Verdict.HOLDS  # best by 200: 0.95
    assert verdict(claim("better", metric="test.accuracy"), records) is Verdict.FAILS  # 0.7 < 0.8


def test_a_diverged_seed_counts_as_the_worst_value() -> None:
    records = seeds("cand", [0.99, 0.99], by="final") + [trial("cand", 3, [0.5, math.nan])]
    records += seeds("base", [0.9, 0.9, 0.9], by="final")
    result = evaluate_claims([claim("better")], records)[0]
    assert records[2].status == "diverged"
    assert result.statistic == -math.inf
    assert result.verdict is Verdict.INCONCLUSIVE  # the mean fails, 2 of 3 seeds hold
    assert verdict(claim("better", rule=Rule("better", margin=0.0, agree=1 / 3)), records) is Verdict.FAILS


# -------------------------------------------------------------------------------------------- missing → inconclusive


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        (seeds("cand", [100] * 3, workload="other") + seeds("base", [500] * 3, workload="other"), "not in the results"),
        (seeds("base", [500] * 3), "no finished final trials of cand"),
        (seeds("cand", [100] * 3), "no finished final trials of base"),
        (seeds("cand", [100] * 2) + seeds("base", [500] * 3), "2 paired finished seeds"),
        (seeds("cand", [100] * 3, phase="tune") + seeds("base", [500] * 3), "no finished final trials of cand"),
    ],
)
def test_absent_or_too_few_trials_are_inconclusive(records: list[TrialRecord], reason: str) -> None:
    result = evaluate_claims([claim()], records)[0]
    assert result.verdict is Verdict.INCONCLUSIVE and reason in result.reason


def test_error_trials_are_not_seeds() -> None:
    records = seeds("cand", [100] * 3) + seeds("base", [500] * 3)
    records[0] = replace(records[0], status="error", error="RuntimeError: boom")
    assert "2 paired finished seeds" in evaluate_claims([claim()], records)[0].reason


def test_a_margin_in_other_units_is_inconclusive() -> None:
    records = seeds("cand", [0.95] * 3, by="final") + seeds("base", [0.9] * 3, by="final")
    c = claim("better", workload_metric="loss")
    assert "written for loss" in evaluate_claims([c], records)[0].reason


# ------------------------------------------------------------------------------------------------ negative controls


def test_lr_zero_never_reaches_the_target_and_never_wins_a_claim() -> None:
    frozen = [trial("cand", s, [0.1] * 10, lr=0.0) for s in (1, 2, 3)]  # lr = 0: the model never moves
    assert all(r.steps_to_target is None for r in frozen)
    baseline = seeds("base", [300, 300, 400])
    assert verdict(claim(), frozen + baseline) is Verdict.FAILS
    assert verdict(claim("better"), frozen + seeds("base", [0.9] * 3, by="final")) is Verdict.FAILS


def test_doctored_candidate_numbers_flip_the_verdict() -> None:
    honest = seeds("cand", [200, 200, 300]) + seeds("base", [500, 500, 600])
    assert verdict(claim(), honest) is Verdict.HOLDS
    doctored = [replace(r, steps_to_target=3 * r.steps_to_target) if r.optimizer == "cand" else r for r in honest]
    assert verdict(claim(), doctored) is Verdict.FAILS

    honest = seeds("cand", [0.93, 0.94, 0.95], by="final") + seeds("base", [0.90, 0.91, 0.92], by="final")
    assert verdict(claim("better"), honest) is Verdict.HOLDS
    doctored = [replace(r, final_val=r.final_val - 0.05) if r.optimizer == "cand" else r for r in honest]
    assert verdict(claim("better"), doctored) is Verdict.FAILS


def test_shipped_claims_judge_whole_runs_of_existing_workloads() -> None:
    from optimlab.bench.workloads import WORKLOADS

    for claim in load_claims(None):
        assert claim.workload in WORKLOADS and claim.baseline_on in WORKLOADS, claim.id
        assert claim.budget == WORKLOADS[claim.workload].max_steps, f"{claim.id}: budget is not the workload's"
        assert claim.budget == WORKLOADS[claim.baseline_on].max_steps, f"{claim.id}: budget is not the workload's"
