"""The shared machinery: randomness in checkpoints, state format versions, the registry and ``create``."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import optimlab
from optimlab._core.optimizer import OptimlabOptimizer
from optimlab._core.validation import Interval
from optimlab.registry import Capabilities, MethodInfo


class NoisySGD(OptimlabOptimizer):
    """A test-only stochastic method: θ ← θ − lr·(g + σ·ξ), ξ ~ N(0, I) from the optimizer's generator."""

    def __init__(self, params, lr: float = 0.1, sigma: float = 1.0, seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, sigma=sigma, seed=seed))

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        return {"step": 0}

    def _update_group(self, group, params, grads, states) -> None:
        for p, g, state in zip(params, grads, states):
            noise = torch.randn(p.shape, generator=self.generator(p.device), dtype=p.dtype, device=p.device)
            p.sub_(g + group["sigma"] * noise, alpha=group["lr"])
            state["step"] += 1


NoisySGD.info = MethodInfo(
    name="noisy-sgd",
    cls=NoisySGD,
    kind="optimizer",
    paper="(test only)",
    arxiv="0000.00000",
    summary="test double",
    hyperparameters={"lr": Interval(0.0), "sigma": Interval(0.0)},
    capabilities=Capabilities(stochastic=True),
)


def _steps(opt, params, n: int) -> None:
    for _ in range(n):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def _round_trip(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_generator_state_is_checkpointed_and_resumes_bit_identically() -> None:
    params = [torch.nn.Parameter(torch.zeros(4, 3))]
    opt = NoisySGD(params, seed=3)
    _steps(opt, params, 3)
    saved = _round_trip(opt)
    resumed_params = [torch.nn.Parameter(params[0].detach().clone())]
    resumed = NoisySGD(resumed_params, seed=99)
    resumed.load_state_dict(saved)
    unrestored_params = [torch.nn.Parameter(params[0].detach().clone())]
    unrestored = NoisySGD(unrestored_params, seed=3)  # same seed, but the stream is not where it was

    for o, ps in ((opt, params), (resumed, resumed_params), (unrestored, unrestored_params)):
        _steps(o, ps, 3)
    assert torch.equal(params[0], resumed_params[0])
    assert not torch.equal(params[0], unrestored_params[0])


def test_newer_state_format_is_refused_with_advice() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = optimlab.Adan(params)
    _steps(opt, params, 1)
    sd = opt.state_dict()
    sd["optimlab"]["version"] = opt.state_version + 1
    with pytest.raises(RuntimeError, match="upgrade optimlab"):
        optimlab.Adan(params).load_state_dict(sd)


def test_older_state_format_goes_through_the_migration_hook() -> None:
    class RenamedAdan(optimlab.Adan):
        state_version = 2

        @classmethod
        def _migrate_state(cls, state_dict, version):
            assert version == 1
            for state in state_dict["state"].values():
                state["exp_avg_sq"] = state.pop("old_name")
            return state_dict

    params = [torch.nn.Parameter(torch.ones(3))]
    old = optimlab.Adan(params)
    _steps(old, params, 2)
    sd = old.state_dict()
    for state in sd["state"].values():
        state["old_name"] = state.pop("exp_avg_sq")
    new = RenamedAdan([torch.nn.Parameter(torch.ones(3))])
    new.load_state_dict(sd)
    assert torch.equal(next(iter(new.state.values()))["exp_avg_sq"], old.state[params[0]]["exp_avg_sq"])


def test_bfloat16_parameters_keep_float32_state_through_a_checkpoint() -> None:
    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))]
    opt = optimlab.Adan(params, lr=1e-2)
    _steps(opt, params, 3)
    resumed_params = [torch.nn.Parameter(params[0].detach().clone())]
    resumed = optimlab.Adan(resumed_params)
    resumed.load_state_dict(_round_trip(opt))
    assert resumed.state[resumed_params[0]]["exp_avg_sq"].dtype == torch.float32
    _steps(opt, params, 3)
    _steps(resumed, resumed_params, 3)
    assert torch.equal(params[0], resumed_params[0])


def test_loading_one_state_dict_twice_shares_no_buffers() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = optimlab.Adan(params)
    _steps(opt, params, 1)
    sd = opt.state_dict()
    other = optimlab.Adan([torch.nn.Parameter(torch.ones(3))])
    other.load_state_dict(sd)
    assert next(iter(other.state.values()))["exp_avg"].data_ptr() != opt.state[params[0]]["exp_avg"].data_ptr()


def test_wrapper_rejects_what_is_not_an_optimizer() -> None:
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        optimlab.OrthoGrad([torch.nn.Parameter(torch.ones(2))])


def test_create_builds_optimizers_and_wrappers_by_name() -> None:
    model = torch.nn.Linear(3, 2)
    assert isinstance(optimlab.create("lion", model, lr=1e-4), optimlab.Lion)
    wrapped = optimlab.create("orthograd", model, inner="adan", lr=1e-2, rescale=False)
    assert isinstance(wrapped.optimizer, optimlab.Adan) and wrapped.options == {"rescale": False}
    assert wrapped.param_groups is wrapped.optimizer.param_groups
    assert isinstance(optimlab.create("orthograd", model).optimizer, torch.optim.AdamW)


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(KeyError, match="available: adagradnorm, adahessian, adan"):
        optimlab.create("adamm", [torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="unknown optimizer 'nope'; choose one of adagradnorm, adahessian, adan"):
        optimlab.create("orthograd", [torch.nn.Parameter(torch.ones(1))], inner="nope")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("lion", optimlab.Lion),
        ("adamw", torch.optim.AdamW),
        ("torch:SGD", torch.optim.SGD),
        ("optimlab.optim.adan:Adan", optimlab.Adan),
        (torch.optim.RMSprop, torch.optim.RMSprop),
    ],
)
def test_one_resolver_names_optimizers_for_create_and_the_bench(spec, expected) -> None:
    from optimlab.bench.runner import resolve_optimizer
    from optimlab.registry import optimizer_class

    assert optimizer_class(spec) is expected
    wrapped = optimlab.create("orthograd", [torch.nn.Parameter(torch.ones(2))], inner=spec, lr=1e-3)
    assert type(wrapped.optimizer) is expected
    if isinstance(spec, str):
        assert resolve_optimizer(spec) is expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torch:Adamm", "torch.optim has no optimizer class"),
        ("math:sqrt", "is not a torch.optim.Optimizer subclass"),
        ("nomodule.x:Y", "cannot import optimizer"),
        (dict, "is not a torch.optim.Optimizer subclass"),
    ],
)
def test_bad_optimizer_specs_are_clear_errors(spec, message) -> None:
    from optimlab.registry import optimizer_class

    with pytest.raises(ValueError, match=message):
        optimizer_class(spec)


@pytest.mark.parametrize("name", optimlab.available())
def test_every_entry_documents_its_method(name: str) -> None:
    info = optimlab.get(name)
    doc = info.cls.__doc__
    assert info.paper and info.summary and info.arxiv in doc
    assert "math::" in doc and "Hyperparameters (defaults)" in doc
    assert ("Coming from AdamW" if info.kind in ("optimizer", "wrapper") else "Coming from") in doc
    for arg, default in info.defaults.items():
        if arg in info.hyperparameters:
            assert f"``{arg}``" in doc, f"{name}: {arg} is not documented"
            info.hyperparameters[arg].check(arg, default)  # defaults obey their own rules
    if info.kind == "optimizer":
        low, high = info.lr_range
        assert 0 < low < high
