"""Data-parallel trials: distributed methods in the simulator (the bench's default) and on real ranks
(``optimlab bench --torchrun``), on the data-parallel workloads."""

from __future__ import annotations

import dataclasses

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
    assert real.curve["bytes_per_worker"] == simulated.curve["bytes_per_worker"]
    torch.testing.assert_close(
        torch.tensor(real.curve["val_loss"]),
        torch.tensor(simulated.curve["val_loss"]),
        rtol=1e-4,
        atol=1e-5,
        equal_nan=True,
    )


def test_a_failed_torchrun_trial_is_an_error_record():
    record = run_trial_torchrun(
        "lsq-hetero", "econtrol[eta=0.1]", {"lr": 0.1}, 1, phase="tune", overrides={"workers": 2, "max_steps": 3}
    )
    assert record.status == "error" and "10 workers" in record.error  # lsq-hetero's data are split 10 ways
