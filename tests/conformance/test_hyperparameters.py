"""Every hyperparameter rule in the registry, from both sides: invalid values raise a ``ValueError`` that names
the argument and the allowed range; valid values, the boundaries included, are accepted."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimlab._core.validation import Choice, Constraint, Each, Flag, Interval

from .problems import make_params
from .subjects import ENTRIES

RULES = [(info, name, rule) for info in ENTRIES for name, rule in info.hyperparameters.items()]
rules = pytest.mark.parametrize("info, name, rule", RULES, ids=[f"{i.name}.{n}" for i, n, _ in RULES])
NOT_NUMBERS = st.sampled_from([None, "0.1", [0.1], object()])


def valid(rule: Constraint) -> st.SearchStrategy:
    if isinstance(rule, Interval):
        bounds = [b for b, closed in ((rule.low, rule.low_closed), (rule.high, rule.high_closed)) if closed]
        bounds = [b for b in bounds if math.isfinite(b)]
        if rule.integer:
            lo = None if rule.low == -math.inf else math.ceil(rule.low) + (0 if rule.low_closed else 1)
            hi = None if rule.high == math.inf else math.floor(rule.high) - (0 if rule.high_closed else 1)
            return st.integers(min_value=lo, max_value=hi)
        inside = st.floats(
            min_value=None if rule.low == -math.inf else rule.low,
            max_value=None if rule.high == math.inf else rule.high,
            exclude_min=not rule.low_closed and math.isfinite(rule.low),
            exclude_max=not rule.high_closed and math.isfinite(rule.high),
            allow_nan=False,
            allow_infinity=False,
        )
        return st.one_of(st.sampled_from(bounds), inside) if bounds else inside
    if isinstance(rule, Each):
        return st.tuples(*(valid(r) for r in rule.items))
    if isinstance(rule, Choice):
        return st.sampled_from(rule.options)
    if isinstance(rule, Flag):
        return st.booleans()
    raise NotImplementedError(type(rule))


def invalid(rule: Constraint) -> st.SearchStrategy:
    if isinstance(rule, Interval):
        options = [NOT_NUMBERS, st.just(math.nan)]
        if math.isfinite(rule.low):
            options.append(st.floats(max_value=rule.low, exclude_max=rule.low_closed, allow_nan=False))
        if math.isfinite(rule.high):
            options.append(st.floats(min_value=rule.high, exclude_min=rule.high_closed, allow_nan=False))
        if rule.integer:
            options.append(st.just(float(max(rule.low, 0)) + 0.5))
        return st.one_of(options)
    if isinstance(rule, Each):
        n = len(rule.items)
        wrong_length = st.lists(st.floats(0, 0.5), max_size=n + 2).filter(lambda v: len(v) != n).map(tuple)
        one_bad = st.integers(0, n - 1).flatmap(
            lambda i: st.tuples(*(invalid(r) if j == i else valid(r) for j, r in enumerate(rule.items)))
        )
        return st.one_of(wrong_length, one_bad, NOT_NUMBERS)
    if isinstance(rule, Choice):
        return st.one_of(st.text(max_size=8).filter(lambda v: v not in rule.options), st.integers(), NOT_NUMBERS)
    if isinstance(rule, Flag):
        return st.one_of(st.integers(0, 1), NOT_NUMBERS)
    raise NotImplementedError(type(rule))


def build(info, **kwargs):
    if info.kind == "wrapper":
        return info.cls(torch.optim.SGD(make_params(), lr=0.1), **kwargs)
    return info.cls(make_params(), **kwargs)


@rules
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_invalid_values_raise_a_value_error_naming_the_argument(info, name, rule, data) -> None:
    value = data.draw(invalid(rule), label=name)
    with pytest.raises(ValueError, match=rf"Invalid {name}\b.*expected"):
        build(info, **{name: value})


@rules
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_valid_values_and_boundaries_are_accepted(info, name, rule, data) -> None:
    build(info, **{name: data.draw(valid(rule), label=name)})


@pytest.mark.parametrize("info", [i for i in ENTRIES if i.kind == "optimizer"], ids=lambda i: i.name)
def test_param_groups_are_validated_too(info) -> None:
    opt = build(info)
    with pytest.raises(ValueError, match=r"Invalid lr: -1\.0; expected a number with 0 <= lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0})
