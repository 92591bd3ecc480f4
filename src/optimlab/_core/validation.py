"""Hyperparameter constraints, declared once per method in the registry and checked here.

A constraint is plain data (bounds, choices) so that the conformance battery can derive valid and invalid
examples from the same declaration that the optimizer enforces. Every failure is a ``ValueError`` that names
the argument, the offending value and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DECAY_RATE", "NON_NEGATIVE", "POSITIVE", "Choice", "Constraint", "Each", "Flag", "Interval", "adam_family", "check_hyperparameters"]


class Constraint:
    """A rule for one hyperparameter. Subclasses implement :meth:`check` and :meth:`describe`."""

    def check(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def describe(self, name: str) -> str:
        raise NotImplementedError

    def _fail(self, name: str, value: Any) -> None:
        raise ValueError(f"Invalid {name}: {value!r}; expected {self.describe(name)}")


def _as_real(value: Any) -> float | None:
    """The value as a Python float when it is a real number (a 0-dim real tensor counts), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.detach().cpu())
    if isinstance(value, numbers.Real):
        return float(value)
    return None


@dataclass(frozen=True)
class Interval(Constraint):
    """A real number in an interval; ``integer=True`` also requires a whole number (an ``int``)."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = True
    integer: bool = False

    def check(self, name: str, value: Any) -> None:
        if self.integer and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            self._fail(name, value)
        x = _as_real(value)
        if x is None or math.isnan(x):
            self._fail(name, value)
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        if not (above and below):
            self._fail(name, value)

    def describe(self, name: str) -> str:
        kind = "an integer" if self.integer else "a number"
        lo = "" if self.low == -math.inf else f"{self.low:g} {'<=' if self.low_closed else '<'} "
        hi = "" if self.high == math.inf else f" {'<=' if self.high_closed else '<'} {self.high:g}"
        return f"{kind} with {lo}{name}{hi}" if (lo or hi) else kind


@dataclass(frozen=True)
class Choice(Constraint):
    """One of a fixed set of values (e.g. the κ of LionK)."""

    options: tuple[Any, ...]

    def check(self, name: str, value: Any) -> None:
        if not any(value == o and type(value) is type(o) for o in self.options):
            self._fail(name, value)

    def describe(self, name: str) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class Flag(Constraint):
    """A ``bool``."""

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            self._fail(name, value)

    def describe(self, name: str) -> str:
        return "True or False"


@dataclass(frozen=True)
class Each(Constraint):
    """A tuple whose i-th entry satisfies ``items[i]``, e.g. ``betas``."""

    items: tuple[Constraint, ...]

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != len(self.items):
            raise ValueError(
                f"Invalid {name}: {value!r}; expected a tuple of {len(self.items)} values"
                f" ({self.describe(name)})"
            )
        for i, (item, rule) in enumerate(zip(value, self.items)):
            rule.check(f"{name}[{i}]", item)

    def describe(self, name: str) -> str:
        return "; ".join(rule.describe(f"{name}[{i}]") for i, rule in enumerate(self.items))


def check_hyperparameters(rules: Mapping[str, Constraint], values: Mapping[str, Any]) -> None:
    """Check every value that has a rule; raise ``ValueError`` on the first violation."""
    for name, rule in rules.items():
        if name in values:
            rule.check(name, values[name])


NON_NEGATIVE = Interval(0.0)
POSITIVE = Interval(0.0, low_closed=False)
DECAY_RATE = Interval(0.0, 1.0, high_closed=False)  # the β of an exponential moving average


def adam_family(betas: int) -> dict[str, Constraint]:
    """The rules Adam-like methods share: ``lr``, ``eps``, ``weight_decay`` ≥ 0 and ``betas`` in [0, 1)."""
    return {"lr": NON_NEGATIVE, "betas": Each((DECAY_RATE,) * betas), "eps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE}
