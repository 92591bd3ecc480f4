"""Optimizer specs: how a suite, a claim and the command line name what a trial trains with.

Grammar (spaces are not allowed)::

    spec      := core [ "@" schedule ]
    core      := name [ "[" key=value { "," key=value } "]" ] [ "(" core ")" ]
    schedule  := "cosine" | "linear" | "refined"

``name`` is anything :func:`optimlab.registry.optimizer_class` accepts (``adan``, ``torch:AdamW``,
``package.module:Class``), a registry communication scheme or aggregator (``econtrol``, ``flag``: on the
data-parallel workloads, :mod:`optimlab.bench.data_parallel`) or, followed by ``(core)``, a registry wrapper
around another spec. ``[...]`` fixes
hyperparameters of that optimizer or wrapper (Python literals: ``torch:AdamW[weight_decay=0]``,
``orthograd[rescale=False](adan)``); the learning rate is the tuner's and cannot be fixed. The schedule shapes
the learning rate over the trial's step budget (the peak is the tuned lr):

``cosine`` (the default; AlgoPerf's shape)
    linear warm-up over the first 2 % of the steps, then cosine decay to zero at the budget.
``linear``
    the same warm-up, then linear decay to zero (Defazio et al., arXiv 2310.07831). These trials log the
    gradient's ℓ1 and ℓ2 norms at every step (``TrialRecord.grad_norms``), the input of the refinement.
``refined``
    the refined schedule of the same paper, computed from the per-step gradient norms of the ``linear`` trial
    of the same spec at the same learning rate (tuning seed): it has no explicit warm-up (one emerges where
    early gradients are large: their weights are small). SGD-style optimizers use the ℓ2 norms (weights Ĝ⁻²), the others the ℓ1 norms
    (Ĝ⁻¹), as the official experiments do.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["SCHEDULES", "OptimizerSpec", "linear_source", "parse_spec"]

SCHEDULES = ("cosine", "linear", "refined")


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed spec: ``name`` with ``fixed`` hyperparameters, around ``inner`` if it is a wrapper."""

    name: str
    fixed: dict[str, Any] = field(default_factory=dict)
    inner: OptimizerSpec | None = None
    schedule: str = "cosine"

    @property
    def innermost(self) -> OptimizerSpec:
        return self if self.inner is None else self.inner.innermost

    @property
    def refinement_norm(self) -> str:
        """The gradient norm whose log the refined schedule is computed from: "l2" for SGD-like optimizers
        (:func:`optimlab.schedules.is_sgd_like`), else "l1"."""
        from optimlab.schedules.rules import is_sgd_like

        return "l2" if is_sgd_like(self.innermost.name) else "l1"

    def with_schedule(self, schedule: str) -> OptimizerSpec:
        return replace(self, schedule=schedule)

    def __str__(self) -> str:
        text = self._core()
        return text if self.schedule == "cosine" else f"{text}@{self.schedule}"

    def _core(self) -> str:
        text = self.name
        if self.fixed:
            text += "[" + ",".join(f"{k}={_literal(v)}" for k, v in self.fixed.items()) + "]"
        if self.inner is not None:
            text += f"({self.inner._core()})"
        return text


def _literal(value: Any) -> str:
    """``repr`` without spaces (a spec has none), for the literals a spec can hold."""
    if isinstance(value, tuple | list):
        items = ",".join(map(_literal, value)) + ("," if isinstance(value, tuple) and len(value) == 1 else "")
        return f"({items})" if isinstance(value, tuple) else f"[{items}]"
    return repr(value)


def parse_spec(text: str) -> OptimizerSpec:
    """Parse ``text`` (grammar in the module docstring); a malformed spec is a ``ValueError`` saying where."""
    if not isinstance(text, str) or not text or any(c.isspace() for c in text):
        raise ValueError(f"invalid optimizer spec {text!r}: expected e.g. 'adan', 'torch:AdamW[weight_decay=0]@linear'")
    core, schedule = _split_top_level(text, "@")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"invalid optimizer spec {text!r}: unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    spec = _parse_core(core, text)
    return spec.with_schedule(schedule or "cosine")


def _split_top_level(text: str, sep: str) -> tuple[str, str | None]:
    """``text`` split at its last ``sep`` outside brackets and parentheses."""
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        c = text[i]
        depth += c in ")]"
        depth -= c in "(["
        if c == sep and depth == 0:
            return text[:i], text[i + 1 :]
    return text, None


def _parse_core(core: str, whole: str) -> OptimizerSpec:
    def fail(why: str) -> ValueError:
        return ValueError(f"invalid optimizer spec {whole!r}: {why}")

    inner = None
    if core.endswith(")"):
        start = _matching_open(core, len(core) - 1, "(", ")")
        if start is None:
            raise fail("unbalanced parentheses")
        inner, core = _parse_core(core[start + 1 : -1], whole), core[:start]
    fixed: dict[str, Any] = {}
    if core.endswith("]"):
        start = _matching_open(core, len(core) - 1, "[", "]")
        if start is None:
            raise fail("unbalanced brackets")
        fixed, core = _parse_fixed(core[start + 1 : -1], fail), core[:start]
    if not core or any(c in core for c in "()[]@,="):
        raise fail(f"{core!r} is not an optimizer name")
    return OptimizerSpec(core, fixed, inner)


def _matching_open(text: str, end: int, open_: str, close: str) -> int | None:
    depth = 0
    for i in range(end, -1, -1):
        depth += text[i] == close
        depth -= text[i] == open_
        if depth == 0:
            return i
    return None


def _parse_fixed(body: str, fail) -> dict[str, Any]:
    try:
        call = ast.parse(f"f({body})", mode="eval").body
    except SyntaxError:
        raise fail(f"[{body}] is not a list of key=value") from None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise fail(f"[{body}] is not a list of key=value")
    fixed = {}
    for keyword in call.keywords:
        if keyword.arg in fixed:
            raise fail(f"{keyword.arg} is given twice")
        try:
            fixed[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise fail(f"the value of {keyword.arg} is not a Python literal") from None
    if "lr" in fixed:
        raise fail("the learning rate is tuned by the bench and cannot be fixed in the spec")
    return fixed


def linear_source(text: str) -> str:
    """The spec of the ``linear`` trials whose gradient norms a ``refined`` spec is computed from."""
    core, schedule = _split_top_level(text, "@")
    if schedule != "refined":
        raise ValueError(f"{text!r} does not use the refined schedule")
    return f"{core}@linear"
