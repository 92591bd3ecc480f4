"""Planning a suite: which tuning trials each search asks for, that the k-th TPE suggestion depends only on the
first k - 1 results (so resumed and shared studies agree), and the per-workload trial counts."""

from __future__ import annotations

import math

import pytest

from optimlab.bench.plan import SUITES, Suite, TrialSpec, pending, planned_count, source_key
from optimlab.bench.records import TrialRecord
from optimlab.bench.runner import lr_range
from optimlab.bench.study import trial_threads
from optimlab.bench.workloads import get_workload

BEST_LR = {"torch:AdamW": 3e-3, "lion": 2e-4}


def fake_result(spec: TrialSpec) -> TrialRecord:
    """Steps to target grow with the distance (in decades) from the optimizer's best learning rate."""
    distance = abs(math.log10(spec.hparams["lr"] / BEST_LR[spec.optimizer]))
    steps = 100 + round(400 * distance)
    return TrialRecord(
        spec.workload, spec.optimizer, spec.hparams, spec.seed, spec.phase, "ok", "loss", False, 1.0,
        steps_to_target=steps, final_val=0.5,
    )


def run(suite: Suite, order=lambda ready: ready[0]) -> dict[str, TrialRecord]:
    """Finish one ready trial at a time (picked by ``order``) until the suite is finished."""
    done: dict[str, TrialRecord] = {}
    while True:
        ready, finished = pending(suite, done)
        if finished:
            assert not ready
            return done
        spec = order(ready)
        done[spec.key] = fake_result(spec)


SMALL = Suite("t", ("quadratic", "rosenbrock"), ("torch:AdamW", "lion"), tuning_trials=6, seeds=2)


@pytest.mark.parametrize("search", ["grid", "tpe"])
def test_every_pair_gets_the_same_budget_and_its_best_lr_runs_on_the_seeds(search: str) -> None:
    suite = SMALL.with_options(search=search)
    done = run(suite)
    assert len(done) == planned_count(suite) == 2 * 2 * (6 + 2)
    for workload in suite.workloads:
        for optimizer in suite.optimizers:
            mine = [r for r in done.values() if (r.workload, r.optimizer) == (workload, optimizer)]
            tune = [r for r in mine if r.phase == "tune"]
            finals = [r for r in mine if r.phase == "final"]
            assert len(tune) == 6 and sorted(r.seed for r in finals) == [1, 2]
            low, high = lr_range(optimizer)
            assert all(low * 0.999 <= r.hparams["lr"] <= high * 1.001 for r in tune)
            best = min(tune, key=lambda r: r.steps_to_target)
            assert all(r.hparams == best.hparams for r in finals)


def test_tpe_suggestions_depend_only_on_earlier_results_not_on_who_ran_what_when() -> None:
    suite = SMALL.with_options(search="tpe")
    first = run(suite)
    again = run(suite, order=lambda ready: ready[-1])  # another interleaving of the pairs
    assert set(first) == set(again)
    one_pair = [r for r in first.values() if r.workload == "quadratic" and r.optimizer == "lion"]
    assert len({r.hparams["lr"] for r in one_pair if r.phase == "tune"}) >= 5  # it explores, not repeats


def test_tpe_asks_one_trial_at_a_time_per_pair_and_resumes_where_it_stopped() -> None:
    suite = SMALL.with_options(search="tpe", workloads=("quadratic",), optimizers=("lion",))
    done: dict[str, TrialRecord] = {}
    for _ in range(3):
        ready, _ = pending(suite, done)
        assert len(ready) == 1
        done[ready[0].key] = fake_result(ready[0])
    resumed, _ = pending(suite, dict(done))  # a fresh planner (a restarted worker) over the same results
    assert resumed == pending(suite, done)[0]


def test_tpe_finds_the_best_learning_rate() -> None:
    suite = SMALL.with_options(search="tpe", tuning_trials=12, workloads=("quadratic",), optimizers=("torch:AdamW",))
    lrs = [r.hparams["lr"] for r in run(suite).values() if r.phase == "tune"]
    distances = [abs(math.log10(lr / BEST_LR["torch:AdamW"])) for lr in lrs]
    assert min(distances) < 0.15


def test_full_suite_spends_fewer_tuning_trials_on_the_costly_workloads() -> None:
    full = SUITES["full"]
    assert full.trials("charlm") == full.trials("modadd-grokking") == 3
    assert full.trials("digits-mlp") == full.tuning_trials == 8
    expected = len(full.optimizers) * sum(full.trials(w) + full.seeds for w in full.workloads)
    assert planned_count(full) == expected
    assert full.with_options(tuning_trials=2).trials("charlm") == 2  # --trials applies to every workload
    with pytest.raises(ValueError, match="search"):
        Suite("x", (), (), 1, 1, search="random")  # type: ignore[arg-type]


def test_trial_threads_follow_the_workload_capped_by_the_cores_per_worker(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    charlm, digits = get_workload("charlm"), get_workload("digits-mlp")
    assert trial_threads(charlm, None, jobs=1) == 2
    assert trial_threads(charlm, None, jobs=2) == 1
    assert trial_threads(digits, None, jobs=1) == 1
    assert trial_threads(digits, 3, jobs=2) == 3  # an explicit --threads wins


def test_a_refined_trial_waits_for_the_linear_trial_it_is_refined_from() -> None:
    BEST_LR.update({"torch:AdamW@linear": 3e-3, "torch:AdamW@refined": 1e-2})
    suite = Suite("r", ("quadratic",), ("torch:AdamW@refined", "torch:AdamW@linear"), tuning_trials=4, seeds=2)
    done: dict[str, TrialRecord] = {}
    while True:
        ready, finished = pending(suite, done)
        if finished:
            break
        for spec in ready:
            if source_key(spec) is not None:
                assert source_key(spec) in done  # never ready before its source
                source = done[source_key(spec)]
                assert (source.optimizer, source.hparams, source.seed) == ("torch:AdamW@linear", {"lr": spec.hparams["lr"]}, 0)
        done[ready[-1].key] = fake_result(ready[-1])  # finish the last ready one: refined trials get a chance first
    assert len(done) == planned_count(suite) == 2 * (4 + 2)
    finals = [r for r in done.values() if r.optimizer == "torch:AdamW@refined" and r.phase == "final"]
    assert len(finals) == 2 and all(source_key(TrialSpec(r.workload, r.optimizer, r.hparams, r.seed, r.phase)) in done for r in finals)


def test_refined_schedules_need_their_linear_source_and_grid_search() -> None:
    with pytest.raises(ValueError, match="add it"):
        Suite("r", ("quadratic",), ("adan@refined",), tuning_trials=4, seeds=2)
    with pytest.raises(ValueError, match="grid"):
        Suite("r", ("quadratic",), ("adan@linear", "adan@refined"), tuning_trials=4, seeds=2, search="tpe")


def test_per_workload_optimizer_lists() -> None:
    aids = SUITES["aids"]
    assert ("modadd-grokking-stablemax", "orthograd(torch:AdamW[weight_decay=0])") in aids.pairs()
    assert ("charlm", "torch:AdamW@refined") in aids.pairs() and ("charlm", "torch:AdamW[weight_decay=0]") not in aids.pairs()
    assert planned_count(aids) == sum(aids.trials(w) + aids.seeds for w, _ in aids.pairs())
    assert aids.with_options(optimizers=("adan",)).pairs() == [(w, "adan") for w in aids.workloads]
    assert "modadd-grokking-stablemax" not in SUITES["full"].workloads  # the full suite keeps its hour


def test_distributed_methods_are_tuned_over_the_range_of_the_step_they_drive():
    """A communication scheme or an aggregator feeds plain SGD: the tuner searches its registry range (SGD-sized
    rates), not the broad default for unknown optimizers."""
    import optimlab
    from optimlab.bench.plan import grid
    from optimlab.bench.runner import lr_range

    for name in ("econtrol", "compressed_sgd", "flag", "mean"):
        assert lr_range(name) == optimlab.get(name).lr_range != lr_range("torch:SGD")
    assert grid("flag", 6)[-1] == optimlab.get("flag").lr_range[1]
