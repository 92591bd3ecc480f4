"""The registry: every method declares itself once, and everything else reads the declaration.

``MethodInfo`` carries what a user, the docs, the conformance battery and the benchmark need to know about a
method: the paper, the official code, the hyperparameter rules, the learning-rate range to tune over, and
capability flags. Defaults are not repeated here: they are read from the class signature, which is the one
place they are written.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from optimlab._core.validation import Constraint

__all__ = ["Capabilities", "MethodInfo", "register", "get", "available", "create", "markdown_table", "REGISTRY"]

Kind = Literal["optimizer", "wrapper", "layer", "loss", "schedule", "solver", "function", "communication", "aggregator"]
# "communication": a compressed-communication scheme for data-parallel training (DDP hook + simulator);
# "aggregator": a rule combining workers' gradients into one (robust aggregation)
KINDS: tuple[str, ...] = (
    "optimizer",
    "wrapper",
    "layer",
    "loss",
    "schedule",
    "solver",
    "function",
    "communication",
    "aggregator",
)


@dataclass(frozen=True)
class Capabilities:
    """What a method needs and supports; the conformance battery picks its checks from these flags."""

    needs_closure: bool = False
    needs_create_graph: bool = False
    per_sample_grads: bool = False  # steps on per-example gradients (p.grad_sample, as Opacus fills it), not p.grad
    global_state: bool = False  # state couples tensors (global clipping, per-matrix SVD, ...)
    stochastic: bool = False  # draws random numbers from its own generator
    sparse_grads: bool = False
    complex_params: bool = False
    fast_path: bool = False
    compilable: bool = True  # a training step with this method runs under torch.compile


@dataclass(frozen=True)
class MethodInfo:
    """One method's declaration.

    ``hyperparameters`` maps each constructor argument to its :class:`~optimlab._core.validation.Constraint`;
    ``lr_range`` is the log-uniform range a fair tuner searches (from the paper's advice); ``exemptions`` maps a
    conformance check's name to the reason the method is exempt (the battery then checks the documented error).
    """

    name: str
    cls: Any  # the class; for kind "function", the function
    kind: Kind
    paper: str
    arxiv: str
    summary: str
    code_url: str | None = None
    hyperparameters: Mapping[str, Constraint] = field(default_factory=dict)
    lr_range: tuple[float, float] | None = None
    capabilities: Capabilities = Capabilities()
    exemptions: Mapping[str, str] = field(default_factory=dict)
    advice: str = ""
    # how the learning rate scales with the batch size (arXiv 2006.09092): "linear" for SGD-like steps,
    # "sqrt" for adaptive (Adam-type) ones, None where the theory says nothing (sign methods, ...)
    batch_scaling: Literal["linear", "sqrt"] | None = None
    # a short code example for the docs where the generated one does not fit (layers, functions)
    usage: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.batch_scaling not in (None, "linear", "sqrt"):
            raise ValueError(f"Invalid batch_scaling: {self.batch_scaling!r}; expected 'linear', 'sqrt' or None")
        unknown = set(self.hyperparameters) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: rules for arguments the class does not take: {sorted(unknown)}")

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword defaults of the class constructor, or of the function for kind "function" (the single place
        they are written)."""
        sig = inspect.signature(self.cls if self.kind == "function" else self.cls.__init__)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
        }

    @property
    def arxiv_url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


_REGISTRY: dict[str, MethodInfo] = {}
REGISTRY: Mapping[str, MethodInfo] = MappingProxyType(_REGISTRY)


def register(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to the registry and attach it to its class as ``cls.info``."""
    if info.name in _REGISTRY and _REGISTRY[info.name].cls is not info.cls:
        raise ValueError(f"a method named {info.name!r} is registered already")
    _REGISTRY[info.name] = info
    info.cls.info = info
    return info


def get(name: str) -> MethodInfo:
    """The registry entry called ``name``; unknown names raise ``KeyError`` listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def available(kind: str | None = None) -> list[str]:
    """Sorted names of the registered methods, optionally of one kind."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {', '.join(KINDS)}")
    return sorted(n for n, i in _REGISTRY.items() if kind is None or i.kind == kind)


_TORCH_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def optimizer_class(spec: str | type) -> type[torch.optim.Optimizer]:
    """The optimizer class ``spec`` names: a class itself; a registry optimizer (``"adan"``); one of torch's by
    its short name (``"sgd"``, ``"adam"``, ``"adamw"``) or as ``"torch:<Class>"``; or any class by import path,
    ``"package.module:Class"``. Anything else, or a class that is not a ``torch.optim.Optimizer``, is a
    ``ValueError`` that lists the choices."""
    cls: Any
    if isinstance(spec, type):
        cls = spec
    elif spec in _REGISTRY and _REGISTRY[spec].kind == "optimizer":
        return _REGISTRY[spec].cls
    elif spec in _TORCH_OPTIMIZERS:
        return getattr(torch.optim, _TORCH_OPTIMIZERS[spec])
    elif spec.startswith("torch:"):
        cls = getattr(torch.optim, spec[len("torch:") :], None)
        if cls is None:
            raise ValueError(f"unknown optimizer {spec!r}: torch.optim has no optimizer class by that name")
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import optimizer {spec!r}: {err}") from None
    else:
        raise ValueError(
            f"unknown optimizer {spec!r}; choose one of {', '.join(available('optimizer'))}, "
            f"{', '.join(sorted(_TORCH_OPTIMIZERS))}, torch:<Class> (e.g. torch:AdamW) or package.module:Class"
        )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{spec!r} is not a torch.optim.Optimizer subclass (got {cls!r})")
    return cls


def create(name: str, params: torch.nn.Module | Iterable[Any], **kwargs: Any) -> Any:
    """Build a registered method on a model or an iterable of parameters (or param groups).

    For a wrapper, ``inner`` names the optimizer it wraps (anything :func:`optimizer_class` accepts; default
    ``"adamw"``); the wrapper's own arguments go to the wrapper and the rest to the inner optimizer::

        opt = optimlab.create("orthograd", model, inner="adan", lr=1e-2)
    """
    info = get(name)
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    if info.kind == "wrapper":
        inner_cls = optimizer_class(kwargs.pop("inner", "adamw"))
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in info.defaults}
        return info.cls(inner_cls(params, **kwargs), **own)
    if info.kind != "optimizer":
        raise TypeError(f"{name!r} is a {info.kind}, not an optimizer; use optimlab.{info.cls.__name__} directly")
    return info.cls(params, **kwargs)


def markdown_table() -> str:
    """The README's table of methods, one row per registry entry."""
    rows = ["| name | class | kind | paper | official code |", "|---|---|---|---|---|"]
    for name in available():
        info = _REGISTRY[name]
        code = f"[code]({info.code_url})" if info.code_url else "none published"
        paper = f"{info.paper} ([arXiv {info.arxiv}]({info.arxiv_url}))"
        rows.append(f"| `{name}` | `{info.cls.__name__}` | {info.kind} | {paper} | {code} |")
    return "\n".join(rows)
