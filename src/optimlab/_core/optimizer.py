"""The thin ``torch.optim.Optimizer`` base every optimlab optimizer shares.

A subclass supplies two things: ``functional``, the method's functional core (called once per param group
with the group's hyperparameters that it takes as keyword arguments), and ``_init_state(p)``, the
per-parameter state created on the first step a parameter has a gradient. Everything around them is written
here once:

* hyperparameter validation from the registry's rules, for every param group;
* gathering params that have gradients, and a clear ``TypeError`` for sparse or complex ones;
* low-precision parameters: state is kept in float32 for bfloat16/float16 parameters, the update is computed
  in float32 and rounded into the parameter once per step;
* ``p.grad`` is never modified (cores receive gradients read-only);
* ``state_dict`` carries a format version (with a migration hook) and, for stochastic methods, the state of the
  optimizer's own ``torch.Generator``, so a resumed run continues bit-identically; state is tensors and plain
  numbers only, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from optimlab._core.validation import check_hyperparameters

if TYPE_CHECKING:
    from optimlab.registry import MethodInfo

__all__ = ["LOW_PRECISION", "OptimlabOptimizer", "as_float", "evaluate_closure", "state_dtype"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
_META_KEY = "optimlab"


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of state and update arithmetic for parameter ``p`` (float32 for 16-bit parameters)."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def as_float(x: float | Tensor) -> float:
    """A hyperparameter as a Python float (tensor learning rates are read once per step)."""
    return float(x) if isinstance(x, Tensor) else x


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """The loss from ``closure`` (re-evaluated with gradients enabled, as ``step`` runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@functools.cache
def _keyword_names(core: Callable[..., None]) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(core).parameters.items() if p.kind is p.KEYWORD_ONLY)


@functools.cache
def _hyperparameter_names(init: Callable[..., None]) -> tuple[str, ...]:
    return tuple(n for n in inspect.signature(init).parameters if n not in ("self", "params"))


class OptimlabOptimizer(torch.optim.Optimizer):
    """Base class; see the module docstring for the contract a subclass fills in."""

    info: ClassVar[MethodInfo]
    state_version: ClassVar[int] = 1
    # the method's functional core, ``core(params, grads, states, **hyperparameters)``
    functional: ClassVar[Callable[..., None]]
    # hyperparameters of something all param groups share (a global clip threshold, one accumulator, one
    # surrogate): every group must hold the same value, read at each step by ``_shared()``
    shared_hyperparameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._generator: torch.Generator | None = None
        super().__init__(params, defaults)

    @staticmethod
    def _defaults_from_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
        """The ``defaults`` of a constructor that passes its hyperparameters through as they are: called as
        ``super().__init__(params, self._defaults_from_arguments(locals()))``, every argument after ``params``
        mapped to its value, in signature order."""
        # The signature is the one list of a constructor's hyperparameters, so no name is written a second time.
        # It is that of the class whose __init__ the locals are from (``__class__``, a local of every method that
        # calls ``super()``), not type(self)'s: Lion passes a subset of its parent LionK's arguments on to it.
        return {name: arguments[name] for name in _hyperparameter_names(arguments["__class__"].__init__)}

    # -- validation -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_hyperparameters(self.info.hyperparameters, {**self.defaults, **param_group})
        if self.param_groups:
            first = self.param_groups[0]
            for key in self.shared_hyperparameters:
                if param_group.get(key, self.defaults[key]) != first[key]:
                    raise ValueError(
                        f"Invalid {key}: {param_group[key]!r} in a param group; expected {first[key]!r}, the first "
                        f"group's ({type(self).__name__}'s {key} acts over all param groups at once)"
                    )
        super().add_param_group(param_group)

    def _shared(self) -> dict[str, Any]:
        """The shared hyperparameters' values, from the param groups (so a loaded checkpoint's values count);
        ``RuntimeError`` if a group was changed to differ from the first."""
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            for key in self.shared_hyperparameters:
                if group[key] != first[key]:
                    raise RuntimeError(
                        f"{type(self).__name__}: {key} differs between param groups ({first[key]!r} and "
                        f"{group[key]!r}); it acts over all groups at once, so give every group the same value"
                    )
        return {key: first[key] for key in self.shared_hyperparameters}

    # -- randomness -------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The optimizer's own generator (created on first use, seeded from the param groups' ``seed``, which a
        loaded checkpoint sets, else ``defaults['seed']``)."""
        if self._generator is None:
            seed = self.param_groups[0].get("seed", self.defaults.get("seed", 0)) if self.param_groups else 0
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(int(seed))
        return self._generator

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one update; ``closure`` re-evaluates the loss (with gradients enabled) and returns it."""
        loss = evaluate_closure(closure)
        batches = [b for b in map(self._gather, self.param_groups) if b[1]]
        self._apply(batches)
        return loss

    def _gather(self, group: dict[str, Any]) -> tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]:
        params, grads, states = [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            self._check_grad(p)
            state = self.state[p]
            if not state:
                state.update(self._init_state(p))
            params.append(p)
            grads.append(grad)
            states.append(state)
        return group, params, grads, states

    def _check_grad(self, p: Tensor) -> None:
        # every parameter on every step: the capabilities are looked up only for a gradient that needs them
        if p.grad.is_sparse and not self.info.capabilities.sparse_grads:
            raise TypeError(
                f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam for sparse parameters"
            )
        if (p.is_complex() or p.grad.is_complex()) and not self.info.capabilities.complex_params:
            raise TypeError(
                f"{type(self).__name__} does not support complex parameters; optimize "
                "torch.view_as_real(p) as a real parameter instead"
            )

    def _apply(self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]]) -> None:
        """Update every batch (one per param group with gradients). Override for cross-group logic."""
        for group, params, grads, states in batches:
            work = [p.float() if p.dtype in LOW_PRECISION else p for p in params]
            self._update_group(
                group, work, [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work)], states
            )
            for p, w in zip(params, work):
                if w is not p:
                    p.copy_(w)

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        type(self).functional(params, grads, states, **self._core_arguments(group))

    def _core_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters that the functional core takes, the learning rate as a float."""
        args = {name: group[name] for name in _keyword_names(type(self).functional) if name in group}
        args["lr"] = as_float(group["lr"])
        return args

    @staticmethod
    def _zeros(p: Tensor) -> Tensor:
        """A zero state buffer for ``p`` in its state dtype."""
        return torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        meta: dict[str, Any] = {"version": self.state_version}
        if self._generator is not None:
            meta["generator"] = self._generator.get_state()
            meta["generator_device"] = str(self._generator.device)
        sd[_META_KEY] = meta
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        meta = state_dict.pop(_META_KEY, {"version": self.state_version})
        version = meta["version"]
        if version > self.state_version:
            raise RuntimeError(
                f"this checkpoint has {type(self).__name__} state format {version}, newer than this optimlab's "
                f"{self.state_version}; upgrade optimlab to load it"
            )
        if version < self.state_version:
            state_dict = self._migrate_state(state_dict, version)
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)
        if "generator" in meta:
            self._generator = torch.Generator(device=meta["generator_device"])
            self._generator.set_state(meta["generator"])

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to the parameter dtype, which would round the float32 state of 16-bit
        # parameters; take the saved tensors at their own dtype instead (and copy, so that two optimizers
        # loaded from one dict never share buffers).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    @classmethod
    def _migrate_state(cls, state_dict: dict[str, Any], version: int) -> dict[str, Any]:
        """Convert a state dict of an older format ``version`` to the current one (override when bumping)."""
        raise RuntimeError(f"{cls.__name__} cannot read state format {version} (current: {cls.state_version})")

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_generator", None)
        super().__setstate__(state)
