"""Linear decay with warm-up: the closed form, its agreement with refinement, and the scheduler."""

from __future__ import annotations

import pytest
import torch

from optimlab.schedules import LinearDecayLR, linear_decay, refine


@pytest.mark.parametrize("total", [2, 3, 10, 101])
def test_without_warmup_it_is_linear_to_zero_at_the_last_step(total: int) -> None:
    values = [linear_decay(t, total) for t in range(total)]
    assert values == [(total - 1 - t) / (total - 1) for t in range(total)]
    assert values[0] == 1.0 and values[-1] == 0.0


@pytest.mark.parametrize("total, warmup", [(10, 3), (100, 10), (5, 4), (7, 2)])
def test_warmup_then_decay(total: int, warmup: int) -> None:
    values = [linear_decay(t, total, warmup) for t in range(total)]
    assert values[:warmup] == [(t + 1) / warmup for t in range(warmup)]
    assert values[warmup - 1] == 1.0 == max(values)  # the peak is the warm-up's last step
    assert values[-1] == 0.0
    decay = values[warmup - 1 :]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([1 / (total - warmup)] * len(steps), rel=1e-12)  # one straight line


def test_one_warmup_step_is_no_warmup_and_the_schedule_ends_at_zero() -> None:
    assert [linear_decay(t, 9, 1) for t in range(9)] == [linear_decay(t, 9) for t in range(9)]
    assert linear_decay(9, 9) == linear_decay(1000, 9, 3) == 0.0


@pytest.mark.parametrize("total", [7, 250])
def test_equals_the_refined_schedule_of_constant_norms(total: int) -> None:
    refined = refine(torch.full((total,), 2.5, dtype=torch.float64), norm="l2")
    expected = torch.tensor([linear_decay(t, total) for t in range(total)], dtype=torch.float64)
    torch.testing.assert_close(refined, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step": 0, "total_steps": 1}, "total_steps"),
        ({"step": 0, "total_steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"step": 0, "total_steps": 10, "warmup_steps": -1}, "warmup_steps"),
        ({"step": -1, "total_steps": 10}, "step"),
        ({"step": 0, "total_steps": 10.0}, "total_steps"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {message}"):
        linear_decay(**kwargs)
    if kwargs["step"] == 0:
        with pytest.raises(ValueError, match=f"Invalid {message}"):
            LinearDecayLR(
                torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                **{k: v for k, v in kwargs.items() if k != "step"},
            )


def _model_and_optimizer() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1, momentum=0.9)
    return model, opt


def _train_step(model: torch.nn.Linear, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.ones(4, 3)).square().sum().backward()
    opt.step()


def test_scheduler_sets_each_groups_lr_to_its_peak_times_the_multiplier() -> None:
    model, opt = _model_and_optimizer()
    sched = LinearDecayLR(opt, total_steps=12, warmup_steps=4)
    for k in range(15):
        factor = linear_decay(k, 12, 4)
        assert [g["lr"] for g in opt.param_groups] == [0.1 * factor, 0.5 * factor]
        assert sched.get_last_lr() == [0.1 * factor, 0.5 * factor]
        _train_step(model, opt)
        sched.step()


def test_scheduler_state_dict_round_trip_continues_identically(tmp_path) -> None:
    model, opt = _model_and_optimizer()
    sched = LinearDecayLR(opt, total_steps=20, warmup_steps=3)
    for _ in range(7):
        _train_step(model, opt)
        sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "c")
    reference = []
    for _ in range(6):
        _train_step(model, opt)
        sched.step()
        reference.append((model.weight.detach().clone(), [g["lr"] for g in opt.param_groups]))

    checkpoint = torch.load(tmp_path / "c", weights_only=True)
    model2, opt2 = _model_and_optimizer()
    sched2 = LinearDecayLR(opt2, total_steps=20, warmup_steps=3)
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    for weight, lrs in reference:
        _train_step(model2, opt2)
        sched2.step()
        assert torch.equal(model2.weight, weight)
        assert [g["lr"] for g in opt2.param_groups] == lrs
