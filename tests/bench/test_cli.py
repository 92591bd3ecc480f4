"""The ``optimlab`` command: clear errors for bad input, a finished report for good input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from optimlab.bench.runner import resolve_optimizer, run_trial
from optimlab.bench.workloads import get_workload
from optimlab.cli import main


class NotAnOptimizer:
    pass


class ExplodingSGD(torch.optim.SGD):
    """Diverges on purpose: a huge step every time."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1e30)
        return loss


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizers", "adamm"], "unknown optimizer 'adamm'; choose one of adagradnorm, adahessian, adan"),
        (["--optimizers", "torch:Nope"], "torch.optim has no optimizer class"),
        (["--optimizers", "tests.bench.test_cli:NotAnOptimizer"], "is not a torch.optim.Optimizer subclass"),
        (["--optimizers", "orthograd(adamm)"], "unknown optimizer 'adamm'"),
        (["--optimizers", "adan(torch:AdamW)"], "unknown wrapper 'adan'"),
        (["--workloads", "imagenet"], "unknown workload 'imagenet'"),
        (["--optimizers", "adan@warmup"], "unknown schedule 'warmup'"),
        (["--optimizers", "adan@refined"], "which the suite does not run there: add it"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path: Path, capsys) -> None:
    assert main(["bench", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "results.jsonl").exists()


def test_report_without_results_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_a_diverging_optimizer_is_recorded_not_a_crash() -> None:
    record = run_trial(get_workload("quadratic"), "tests.bench.test_cli:ExplodingSGD", {"lr": 0.1}, 0, phase="tune")
    assert record.status == "diverged" and record.steps_to_target is None
    assert not math.isfinite(record.curve["val_loss"][-1])


def test_zero_learning_rate_never_reaches_a_target() -> None:
    """Negative control: with lr = 0 nothing moves, so no target is reached."""
    record = run_trial(get_workload("digits-mlp"), "torch:AdamW", {"lr": 0.0}, 0, phase="tune")
    assert record.status == "ok" and record.steps_to_target is None
    assert len(set(record.curve["val_metric"])) == 1


def test_wrapper_specs_build_the_inner_optimizer() -> None:
    opt = resolve_optimizer("orthograd(torch:AdamW)")([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    assert isinstance(opt.optimizer, torch.optim.AdamW)


def test_bench_end_to_end_writes_results_and_a_report(tmp_path: Path) -> None:
    args = ["bench", "--out", str(tmp_path), "--workloads", "quadratic", "--optimizers", "torch:AdamW,lion"]
    assert main([*args, "--trials", "2", "--seeds", "1", "--no-progress"]) == 0
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "report.md").stat().st_size > 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2 * (2 + 1)


def test_optimizer_lists_keep_commas_inside_specs_and_suite_names_match() -> None:
    from optimlab.bench.plan import SUITES
    from optimlab.cli import SUITE_NAMES, _csv

    assert _csv("adan, torch:AdamW[weight_decay=0,betas=(0.9,0.98)]@linear,orthograd(lion),") == (
        "adan",
        "torch:AdamW[weight_decay=0,betas=(0.9,0.98)]@linear",
        "orthograd(lion)",
    )
    assert SUITE_NAMES == tuple(SUITES)


def test_second_order_optimizers_train_through_a_graph_of_the_gradient() -> None:
    from optimlab.bench.runner import needs_create_graph

    assert needs_create_graph("adahessian")
    assert not needs_create_graph("torch:AdamW") and not needs_create_graph("adan")
    record = run_trial(get_workload("digits-logreg"), "adahessian", {"lr": 0.1}, 0, phase="tune")
    assert record.status == "ok", record.error  # AdaHessian refuses gradients without a graph
    assert record.steps_to_target is not None


def test_an_optimizer_can_split_the_model_as_its_paper_does() -> None:
    from optimlab.bench.runner import model_param_groups

    task = get_workload("charlm").build(0)
    plain = model_param_groups("torch:AdamW", task.model)
    assert [id(p) for p in plain] == [id(p) for p in task.model.parameters()]
    groups = model_param_groups("frugal", task.model)  # FRUGAL.model_param_groups: projectable matrices apart
    projected = {id(p) for g in groups if g["project"] for p in g["params"]}
    names = {n for n, p in task.model.named_parameters() if id(p) in projected}
    assert names and all(n.endswith(("qkv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight")) for n in names)
    assert sum(len(g["params"]) for g in groups) == len(plain)
