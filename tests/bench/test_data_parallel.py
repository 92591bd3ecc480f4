"""Data-parallel trials: distributed methods in the simulator (the bench's default) and on real ranks
(``optimlab bench --torchrun``), on the data-parallel workloads."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import uuid

import pytest
import torch

from optimlab.bench.data_parallel import allreduce_bytes
from optimlab.bench.runner import check_spec, run_trial
from optimlab.bench.torchrun import run_trial_torchrun
from optimlab.bench.workloads import get_workload

pytestmark = pytest.mark.usefixtures("one_thread")


def short(name: str, **changes) -> object:
    return dataclasses.replace(get_workload(name), **changes)


def test_error_feedback_converges_where_compressed_sgd_stalls():
    """lsq-hetero at one step size: EControl and EF21 reach the target, compressed SGD without error feedback
    stalls far from it (the bias of Top-K on heterogeneous workers), and each worker sends Top-K's 4 values and
    indices (4 × (8 + 4) bytes) where DDP's all-reduce sends all 40 float64 gradients."""
    workload = get_workload("lsq-hetero")
    records = {
        spec: run_trial(workload, spec, {"lr": 0.3}, 1, phase="tune")
        for spec in ("econtrol[eta=0.1]", "ef21", "compressed_sgd", "torch:SGD")
    }
    assert all(r.status == "ok" for r in records.values())
    assert records["econtrol[eta=0.1]"].steps_to_target is not None
    assert records["ef21"].steps_to_target is not None
    assert records["compressed_sgd"].steps_to_target is None and records["compressed_sgd"].final_val > 0.1
    assert records["econtrol[eta=0.1]"].curve["bytes_per_worker"][-1] == 4 * (8 + 4)
    assert records["torch:SGD"].curve["bytes_per_worker"][-1] == 40 * 8


def test_onebit_adam_sends_its_compressed_momentum_after_the_warm_up():
    workload = short("mnist1d-cnn-4workers", max_steps=50, eval_every=5)
    record = run_trial(workload, "onebit_adam", {"lr": 1e-3}, 1, phase="tune")
    task = workload.build(1)
    full = allreduce_bytes([p for p in task.model.parameters()])
    sent = record.curve["bytes_per_worker"]
    assert sent[0] == full  # warm-up: DDP's fp32 average (the variance freezes after 20 % of 50 steps)
    assert sent[-1] * 16 <= full


def test_aggregators_meet_the_workloads_attack():
    """Three of 15 workers send ten times their negated gradient: the mean ascends, Flag still learns."""
    workload = short("digits-mlp-byzantine", max_steps=100, eval_every=50)
    flag = run_trial(workload, "flag", {"lr": 0.3}, 1, phase="tune")
    mean = run_trial(workload, "mean", {"lr": 0.3}, 1, phase="tune")
    assert flag.final_val > 0.8
    assert mean.status == "diverged" or mean.final_val < 0.3


def test_distributed_methods_need_a_data_parallel_workload():
    with pytest.raises(ValueError, match="data-parallel workload"):
        check_spec("econtrol[eta=0.1]", get_workload("digits-mlp"))
    check_spec("econtrol[eta=0.1]", get_workload("lsq-hetero"))
    check_spec("torch:AdamW", get_workload("lsq-hetero"))  # any optimizer trains on the whole minibatch
    with pytest.raises(ValueError, match="unknown optimizer"):
        check_spec("nonesuch", get_workload("lsq-hetero"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec, lr", [("econtrol[eta=0.1]", 0.1), ("flag", 0.3), ("onebit_adam", 1e-3)])
def test_a_torchrun_trial_equals_the_simulated_one(spec, lr):
    """Two real gloo ranks launched by torchrun, DDP with the method's hook (the robust hook for Flag, 1-bit
    Adam's own), against the simulator on the same minibatches: the same validation curve and bytes."""
    overrides = {"workers": 2, "max_steps": 30, "eval_every": 10}
    real = run_trial_torchrun("mnist1d-cnn-4workers", spec, {"lr": lr}, 1, phase="tune", overrides=overrides)
    assert real.status in ("ok", "diverged"), real.error
    assert real.workload == "mnist1d-cnn-4workers" and real.env["launcher"] == "torchrun"
    simulated = run_trial(short("mnist1d-cnn-4workers", **overrides), spec, {"lr": lr}, 1, phase="tune")
    assert_same_trial(real, simulated)


def assert_same_trial(real, simulated) -> None:
    """The same bytes per worker and the same curves: validation and the logged training loss (the workers'
    mean, as the simulator logs it, not rank 0's share)."""
    assert real.curve["bytes_per_worker"] == simulated.curve["bytes_per_worker"]
    for column in ("val_loss", "train_loss"):
        torch.testing.assert_close(
            torch.tensor(real.curve[column]),
            torch.tensor(simulated.curve[column]),
            rtol=1e-4,
            atol=1e-5,
            equal_nan=True,
        )


@pytest.mark.timeout(300)
def test_a_torchrun_trial_with_a_byzantine_rank_equals_the_simulated_one():
    """The last rank sends the workload's attack on real ranks as the last simulated worker does; what a worker
    sends is its one gradient (the adversary's view of the honest gradients is part of the simulated attack, not of
    the method's communication)."""
    overrides = {"workers": 3, "byzantine": 1, "max_steps": 20, "eval_every": 10}
    real = run_trial_torchrun("digits-mlp-byzantine", "flag", {"lr": 0.3}, 1, phase="tune", overrides=overrides)
    assert real.status == "ok", real.error
    simulated = run_trial(short("digits-mlp-byzantine", **overrides), "flag", {"lr": 0.3}, 1, phase="tune")
    task = get_workload("digits-mlp-byzantine").build(1)
    assert simulated.curve["bytes_per_worker"][-1] == allreduce_bytes(list(task.model.parameters()))
    assert_same_trial(real, simulated)


def test_a_failed_torchrun_trial_is_an_error_record():
    record = run_trial_torchrun(
        "lsq-hetero", "econtrol[eta=0.1]", {"lr": 0.1}, 1, phase="tune", overrides={"workers": 2, "max_steps": 3}
    )
    assert record.status == "error" and "10 workers" in record.error  # lsq-hetero's data are split 10 ways


def _our_processes(marker: str) -> dict[int, str]:
    """pid -> command line of the processes whose environment holds ``marker`` (ours: the test sets it)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours
            continue
    return found


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_a_hung_torchrun_trial_is_an_error_record_and_leaves_no_ranks(monkeypatch):
    """A trial that outlives the launch's timeout: an error record that says so, and no rank left running (torchrun
    starts its ranks in sessions of their own, so killing torchrun alone would orphan them)."""
    marker = f"OPTIMLAB_TEST_RUN={uuid.uuid4().hex}"
    name, value = marker.split("=")
    monkeypatch.setenv(name, value)
    ranks_seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            ranks_seen.update(
                pid
                for pid, cmd in _our_processes(marker).items()
                if "-m optimlab.bench.torchrun" in cmd and "torch.distributed.run" not in cmd  # a rank, not torchrun
            )
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    overrides = {"workers": 2, "max_steps": 10**7, "eval_every": 10**6, "max_seconds": 10**4}
    try:
        record = run_trial_torchrun(
            "mnist1d-cnn-4workers", "torch:SGD", {"lr": 0.1}, 1, phase="tune", overrides=overrides, timeout=25
        )
        done.set()
        watcher.join()
        assert record.status == "error" and "timed out after 25 s" in record.error, record.error
        assert len(ranks_seen) == 2  # the ranks were training when the launch timed out
        deadline = time.monotonic() + 10
        while _our_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _our_processes(marker)
    finally:
        done.set()
        for pid in _our_processes(marker):  # what this test started and the launcher left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_a_refined_torchrun_trial_gets_its_schedule_source():
    """A refined spec on real ranks computes its schedule from the linear-decay trial handed over by the launcher."""
    overrides = {"workers": 2, "max_steps": 12, "eval_every": 6}
    workload = short("mnist1d-cnn-4workers", **overrides)
    linear = run_trial(workload, "torch:Adam@linear", {"lr": 1e-3}, 0, phase="tune")
    refined = run_trial_torchrun("mnist1d-cnn-4workers", "torch:Adam@refined", {"lr": 1e-3}, 0, phase="tune",
                                 overrides=overrides, schedule_source=linear)
    assert refined.status == "ok", refined.error
