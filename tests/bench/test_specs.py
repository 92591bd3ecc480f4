"""Optimizer specs: fixed hyperparameters, wrappers and schedules, and the errors of malformed ones."""

from __future__ import annotations

import math

import pytest
import torch

import optimlab
from optimlab.bench.runner import lr_factor, lr_range, resolve_optimizer
from optimlab.bench.specs import OptimizerSpec, linear_source, parse_spec


def test_parse_names_fixed_hyperparameters_wrappers_and_schedules() -> None:
    assert parse_spec("adan") == OptimizerSpec("adan")
    spec = parse_spec("orthograd[rescale=False](torch:AdamW[weight_decay=0,betas=(0.9,0.98)])@linear")
    assert spec.name == "orthograd" and spec.fixed == {"rescale": False} and spec.schedule == "linear"
    assert spec.inner == OptimizerSpec("torch:AdamW", {"weight_decay": 0, "betas": (0.9, 0.98)})
    assert spec.innermost.name == "torch:AdamW"
    assert parse_spec(str(spec)) == spec  # str() writes the spec back
    assert parse_spec("tests.bench.test_cli:ExplodingSGD").name == "tests.bench.test_cli:ExplodingSGD"
    assert linear_source("torch:AdamW[weight_decay=0]@refined") == "torch:AdamW[weight_decay=0]@linear"
    # SGD-like optimizers are refined from ℓ2 norms (weights Ĝ⁻²), the others from ℓ1 norms, however named
    for sgd in ("sgd", "torch:SGD", "torch.optim:SGD", "coordclip_sgd", "orthograd(sgd[momentum=0.9])"):
        assert parse_spec(sgd + "@refined").refinement_norm == "l2", sgd
    for adaptive in ("torch:AdamW", "adan", "lion", "coordclip_adam"):
        assert parse_spec(adaptive + "@refined").refinement_norm == "l1", adaptive


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adan@warmup", "unknown schedule"),
        ("adan[lr=1]", "cannot be fixed"),
        ("adan[weight_decay]", "key=value"),
        ("adan[weight_decay=zero]", "not a Python literal"),
        ("adan[betas={[]:1}]", "not a Python literal"),
        ("sgd[momentum=0.9,momentum=0.5]", "given twice"),
        ("orthograd(adan", "optimizer name"),
        ("adan]", "unbalanced"),
        ("", "invalid optimizer spec"),
        ("torch:AdamW [weight_decay=0]", "invalid optimizer spec"),
    ],
)
def test_malformed_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


def test_fixed_hyperparameters_reach_the_optimizer_they_belong_to() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = resolve_optimizer("orthograd[rescale=False](torch:AdamW[weight_decay=0])@refined")(params, lr=0.1)
    assert isinstance(opt, optimlab.OrthoGrad) and opt.options == {"rescale": False}
    assert opt.param_groups[0]["weight_decay"] == 0 and opt.param_groups[0]["lr"] == 0.1
    assert lr_range("orthograd(adan[weight_decay=0.02])@linear") == optimlab.get("adan").lr_range


def test_schedules_shapes() -> None:
    cosine, linear = lr_factor("adan", 100), lr_factor("adan@linear", 100)
    assert cosine(0) == linear(0) == 0.5 and cosine(1) == linear(1) == 1.0  # 2 warm-up steps
    assert cosine(99) == pytest.approx(0.5 * (1 + math.cos(97 / 98 * math.pi)))
    assert [linear(t) for t in (1, 50, 100)] == pytest.approx([1.0, 0.5, 0.0], abs=0.011)
    with pytest.raises(ValueError, match="no gradient-norm log"):
        lr_factor("adan@refined", 100)


def test_linear_trials_log_per_step_norms_and_refined_trials_follow_them() -> None:
    from optimlab.bench.runner import run_trial
    from optimlab.bench.workloads import get_workload
    from optimlab.schedules import refine

    workload = get_workload("quadratic")
    linear = run_trial(workload, "torch:SGD@linear", {"lr": 1e-3}, 0, phase="tune")
    assert linear.status == "ok" and linear.steps == workload.max_steps
    assert len(linear.grad_norms["l1"]) == len(linear.grad_norms["l2"]) == workload.max_steps
    # the log is of the gradient each step used: ℓ2 ≤ ℓ1, both positive and shrinking as SGD converges
    assert all(0 < b <= a * (1 + 1e-12) for a, b in zip(linear.grad_norms["l1"], linear.grad_norms["l2"]))
    assert linear.grad_norms["l2"][-1] < linear.grad_norms["l2"][0]
    factor = lr_factor("torch:SGD@refined", workload.max_steps, linear)
    expected = refine(linear.grad_norms["l2"], norm="l2", steps=workload.max_steps)  # SGD: ℓ2 norms
    assert [factor(t) for t in range(workload.max_steps)] == expected.tolist()
    refined = run_trial(workload, "torch:SGD@refined", {"lr": 1e-3}, 0, phase="tune", schedule_source=linear)
    assert refined.status == "ok" and len(refined.grad_norms["l2"]) == workload.max_steps
    assert run_trial(workload, "torch:SGD", {"lr": 1e-3}, 0, phase="tune").grad_norms == {}  # cosine: no log
    missing = run_trial(workload, "torch:SGD@refined", {"lr": 1e-3}, 0, phase="tune")
    assert missing.status == "error" and "no gradient-norm log" in missing.error
