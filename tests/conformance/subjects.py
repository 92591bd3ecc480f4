"""What the conformance battery runs on, derived from the registry alone (no per-method code).

Each optimizer entry yields its default configuration plus one variant per non-default choice, per flipped
flag and, where the method has one, a nonzero ``weight_decay``. Each wrapper entry yields itself around
torch's SGD (with momentum), torch's AdamW and an optimlab optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

import optimlab
from optimlab._core.validation import Choice, Flag
from optimlab.registry import MethodInfo

# inner optimizers a wrapper is checked around: (label, class, its hyperparameters)
WRAPPER_INNERS: tuple[tuple[str, type, dict[str, Any]], ...] = (
    ("sgd", torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-2}),
    ("lion", optimlab.Lion, {"lr": 1e-3}),
)


# construction arguments beyond the hyperparameters for entries that cannot otherwise run in one process:
# 1-bit Adam as one simulated worker, with a warm-up short enough that the checks reach its frozen-variance phase
CONSTRUCTION: dict[str, dict[str, Any]] = {"onebit_adam": {"workers": 1, "freeze_step": 3}}


@dataclass(frozen=True)
class Subject:
    """One configuration of one registry entry, and how to build it on a list of parameters."""

    id: str
    info: MethodInfo
    hparams: dict[str, Any]
    inner: tuple[str, type, dict[str, Any]] | None = None

    def make(self, params: Iterable[Any], **overrides: Any) -> torch.optim.Optimizer:
        """Build the subject; ``overrides`` go to the optimizer that owns the learning rate."""
        if self.inner is None:
            return self.info.cls(params, **{**self.hparams, **overrides})
        _, inner_cls, inner_hparams = self.inner
        return self.info.cls(inner_cls(params, **{**inner_hparams, **overrides}), **self.hparams)

    @property
    def lr(self) -> float:
        return (self.inner[2] if self.inner else self.hparams)["lr"]

    def exempt(self, check: str) -> str | None:
        return self.info.exemptions.get(check)


def _tuning_lr(info: MethodInfo) -> float:
    low, high = info.lr_range or (1e-4, 1e-2)
    return math.sqrt(low * high)


def _variants(info: MethodInfo) -> list[tuple[str, dict[str, Any]]]:
    defaults = info.defaults
    out: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for name, rule in info.hyperparameters.items():
        if isinstance(rule, Choice):
            out += [(f"{name}={o}", {name: o}) for o in rule.options if o != defaults[name]]
        elif isinstance(rule, Flag):
            out.append((f"{name}={not defaults[name]}", {name: not defaults[name]}))
    if "weight_decay" in info.hyperparameters:
        out.append(("weight_decay=0.1", {"weight_decay": 0.1}))
    return out


def _subjects() -> list[Subject]:
    subjects = []
    for name in optimlab.available():
        info = optimlab.get(name)
        if info.kind == "optimizer" and info.capabilities.needs_closure:
            continue  # its step() takes a method-specific closure, not gradients: see CLOSURE_ENTRIES
        if info.kind == "optimizer":
            lr = _tuning_lr(info)
            for label, hp in _variants(info):
                subjects.append(Subject(f"{name}[{label}]", info, {"lr": lr, **CONSTRUCTION.get(name, {}), **hp}))
        elif info.kind == "wrapper":
            for label, hp in _variants(info):
                for inner in WRAPPER_INNERS:
                    subjects.append(Subject(f"{name}[{label}]({inner[0]})", info, hp, inner=inner))
    return subjects


SUBJECTS: list[Subject] = _subjects()
ENTRIES: list[MethodInfo] = [optimlab.get(n) for n in optimlab.available() if optimlab.get(n).kind in ("optimizer", "wrapper")]
# optimizers whose step() needs a closure of their own form (documented on the class); the gradient-driven checks
# above cannot drive them, so the battery checks only their documented error for a missing closure
CLOSURE_ENTRIES: list[MethodInfo] = [
    info for info in ENTRIES if info.kind == "optimizer" and info.capabilities.needs_closure
]
