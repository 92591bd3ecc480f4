r"""DP-SGD with per-sample clipping (the "GC" baseline of DiceSGD), and what the private optimizers share.

Paper: Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential Privacy",
CCS 2016, arXiv `1607.00133 <https://arxiv.org/abs/1607.00133>`_. Reference implementation: Opacus
(https://github.com/pytorch/opacus, ``opacus/optimizers/optimizer.py``, ``DPOptimizer``), whose accountant
:mod:`optimlab.privacy.accounting` uses.

At each step, with the per-sample gradients :math:`g_i` of the records :math:`i \in B_t` of a Poisson-sampled
batch, clipped over **all** parameters of one record together:

.. math::

    \operatorname{clip}(g, C) &= g \cdot \min\Big(1, \frac{C}{\lVert g\rVert}\Big) \\
    \hat g &= \frac{1}{\bar B}\Big[\sum_{i \in B_t} \operatorname{clip}(g_i, C) + \mathcal N(0, \sigma^2 C^2 I)\Big]
    \\
    \theta &\leftarrow \theta - \alpha\, \hat g

The clip factor is the exact :math:`\min(1, C/\lVert g\rVert)` of the paper (a zero gradient stays zero;
Opacus divides by :math:`\lVert g\rVert + 10^{-6}`, which clips slightly harder).

**Normalisation** (:math:`\bar B`, ``expected_batch_size``). Under Poisson sampling the batch size
:math:`|B_t|` is random and depends on whether a given record was sampled; dividing the noisy sum by it would
make the released step a function of more than the noisy sum. Like Opacus (``expected_batch_size``, with
``loss_reduction="mean"``), :math:`\bar B` is the *expected* batch size :math:`qN`, a data-independent constant,
so the step is post-processing of the Gaussian mechanism and an empty batch takes a noise-only step. With
``expected_batch_size=None`` the divisor is the actual number of per-sample gradients (the formula for a
fixed-size batch); an empty batch is then an error.

**Per-sample gradients.** The optimizer never reads or writes ``p.grad`` (a batch gradient cannot be clipped
per record). ``step`` takes them in one of three ways:

* ``opt.step(per_sample_grads)``: one tensor of shape ``(B, *p.shape)`` per parameter, in the order of the
  parameters over the param groups (``None`` for a parameter without a gradient this step);
* ``opt.step()`` reads ``p.grad_sample``, the attribute Opacus's ``GradSampleModule`` fills (``zero_grad``
  clears it, as Opacus's ``DPOptimizer.zero_grad`` does);
* ``opt.step_batch(model, loss_fn, inputs, targets)`` computes them with :mod:`optimlab.per_sample`
  (``torch.func``; the model is not modified) and steps; it returns the batch's mean loss, which is **not**
  private.

Without any of them ``step`` raises a ``RuntimeError`` saying so. Noise comes from the optimizer's own
``torch.Generator`` (seeded by ``seed``; its state is in ``state_dict``, so a resumed run is bit-identical).
:func:`train_private` runs the whole private loop: Poisson loader, per-sample gradients, step, accountant.

Hyperparameters (defaults), from Opacus's MNIST example ``examples/mnist.py``: ``lr`` 0.1,
``max_grad_norm`` :math:`C` 1.0 (> 0; ``inf`` disables clipping, and then needs ``noise_multiplier`` 0),
``noise_multiplier`` :math:`\sigma` 1.0 (≥ 0; calibrate it to a target :math:`(\varepsilon, \delta)` with
:func:`~optimlab.privacy.accounting.noise_multiplier_for`), ``expected_batch_size`` None (set it to :math:`qN`
for Poisson sampling), ``seed`` 0. ``max_grad_norm``, ``noise_multiplier``, ``expected_batch_size`` and ``seed``
act on all param groups at once (one clipping norm over all parameters, one mechanism); groups may differ in
``lr``.

Coming from AdamW: DP-SGD is SGD on clipped, noised gradients: learning rates of SGD (the example's 0.1, up
to ~1 with a clipping norm near the gradients' typical size), a large expected batch (the noise on the mean
shrinks as 1/B), and the noise multiplier from the privacy budget, not tuned.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from optimlab._core.optimizer import OptimlabOptimizer, as_float, evaluate_closure, state_dtype
from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Interval, check_hyperparameters
from optimlab.per_sample import per_sample_grads_and_losses
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = ["DPSGD", "PrivateOptimizer", "clip_factors", "dp_sgd_", "train_private", "PrivateTrainingResult"]

SEED = Interval(0, float(2**63), integer=True)  # within what torch.Generator.manual_seed takes
NOISE_MULTIPLIER = Interval(0.0, math.inf, high_closed=False)


def clip_factors(per_sample_grads: Sequence[Tensor], max_norm: float) -> Tensor:
    r""":math:`\min(1, C/\lVert g_i\rVert)` for each record :math:`i`, the norm over all the tensors of
    ``per_sample_grads`` (each ``(B, ...)``); shape ``(B,)``, in float32 or wider."""
    batch = per_sample_grads[0].shape[0]
    dtype = functools.reduce(torch.promote_types, (state_dtype(g) for g in per_sample_grads))
    norms = torch.stack(
        [
            torch.linalg.vector_norm(g.reshape(batch, math.prod(g.shape[1:])), dim=1, dtype=dtype)
            for g in per_sample_grads
        ]
    )
    return scale_to(torch.linalg.vector_norm(norms, dim=0), max_norm)


def scale_to(norm: Tensor, threshold: float) -> Tensor:
    """``min(1, threshold / norm)``, elementwise; 1 for a zero norm (a zero vector needs no clipping, and
    ``threshold`` 0 then gives a zero vector too), 1 everywhere for an infinite threshold."""
    return (threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max(1.0)


def add_gaussian_(out: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``out += N(0, std² I)``, drawn from ``generator`` in ``out``'s dtype and on its device."""
    if std > 0:
        out.add_(torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device), alpha=std)
    return out


def dp_sgd_(
    params: list[Tensor],
    per_sample_grads: list[Tensor],
    *,
    lrs: Sequence[float],
    max_grad_norm: float,
    noise_multiplier: float,
    batch_size: float,
    generator: torch.Generator,
) -> None:
    """Functional DP-SGD-GC: one step on ``params`` (``lrs``, one learning rate per parameter) from their
    per-sample gradients, the clipping norm over all of ``params``, the noisy sum divided by ``batch_size``."""
    factors = clip_factors(per_sample_grads, max_grad_norm)
    std = noise_multiplier * max_grad_norm if noise_multiplier else 0.0
    for p, g, lr in zip(params, per_sample_grads, lrs):
        g = g.to(state_dtype(p))
        noisy_sum = add_gaussian_(torch.tensordot(factors.to(g.dtype), g, dims=1), std, generator)
        p.add_(noisy_sum, alpha=-lr / batch_size)


class PrivateOptimizer(OptimlabOptimizer):
    """The per-sample-gradient optimizers' shared step: gathering and checking the per-sample gradients, the
    normaliser, the generator, ``step_batch``. A subclass supplies ``_private_update``."""

    shared_hyperparameters = ("max_grad_norm", "noise_multiplier", "expected_batch_size", "seed")
    # GradScaler then hands this optimizer its scale (grad_scale) instead of unscaling p.grad, so step() can refuse
    _step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_hyperparameters(self.info.hyperparameters, merged)  # before the checks that combine them
        self._check_group(merged)
        super().add_param_group(param_group)

    def _check_group(self, merged: dict[str, Any]) -> None:
        """Rules beyond the registry's per-argument ones (a subclass adds its own)."""
        size = merged["expected_batch_size"]
        if size is not None:
            POSITIVE.check("expected_batch_size", size)
            if not math.isfinite(size):
                raise ValueError(f"Invalid expected_batch_size: {size!r}; expected a finite number > 0 or None")
        if merged["noise_multiplier"] > 0 and not math.isfinite(merged["max_grad_norm"]):
            raise ValueError(
                f"Invalid max_grad_norm: {merged['max_grad_norm']!r}; expected a finite number when noise_multiplier "
                "> 0 (the noise std is noise_multiplier * max_grad_norm); use inf only with noise_multiplier=0"
            )

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``p.grad`` as torch's ``zero_grad``, and ``p.grad_sample`` (Opacus's per-sample gradients) removed."""
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, "grad_sample", None) is not None:
                    p.grad_sample = None

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, per_sample_grads: Sequence[Tensor | None] | None = None, *, closure: Callable[[], Any] | None = None
    ) -> Any:
        """One private step from per-sample gradients (see the module docstring): ``per_sample_grads`` is one
        ``(B, *p.shape)`` tensor (or ``None``) per parameter, in param-group order; ``None`` reads
        ``p.grad_sample``. ``closure`` re-evaluates the loss (and may fill ``p.grad_sample``) and is returned; as
        in torch, ``step(closure)`` with a callable first argument is a closure. ``GradScaler`` is refused with a
        ``TypeError`` (it would leave the per-sample gradients scaled)."""
        if callable(per_sample_grads):  # torch's step(closure) convention
            if closure is not None:
                raise TypeError("pass one closure, not two")
            per_sample_grads, closure = None, per_sample_grads
        if getattr(self, "grad_scale", None) is not None:
            for attribute in ("grad_scale", "found_inf"):  # GradScaler set them and removes them only on success
                self.__dict__.pop(attribute, None)
            raise TypeError(
                f"{type(self).__name__} does not support GradScaler: it unscales p.grad, not per-sample gradients, "
                "so they would be clipped at the loss scale; compute per-sample gradients without loss scaling "
                "(step_batch does, in the parameters' dtype)"
            )
        loss = evaluate_closure(closure)
        entries = self._gather_per_sample(per_sample_grads)
        batch = entries[0][1].shape[0]
        shared = self._shared()
        size = shared["expected_batch_size"]
        if size is None and batch == 0:
            raise RuntimeError(
                "an empty batch with expected_batch_size=None: nothing to divide by. Under Poisson sampling set "
                "expected_batch_size=sample_rate * len(dataset) (an empty batch then takes a noise-only step)"
            )
        params = [p for p, _, _ in entries]
        self._private_update(
            params,
            [g for _, g, _ in entries],
            [self._state_for(p) for p in params],
            lrs=[as_float(group["lr"]) for _, _, group in entries],
            batch_size=float(batch if size is None else size),
            generator=self.generator(params[0].device),
            **{k: v for k, v in shared.items() if k not in ("expected_batch_size", "seed")},
        )
        return loss

    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state.update(self._init_state(p))
        return state

    def _private_update(
        self,
        params: list[Tensor],
        per_sample_grads: list[Tensor],
        states: list[dict[str, Any]],
        **hyperparameters: Any,
    ) -> None:
        raise NotImplementedError

    def _missing(self) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__} needs per-sample gradients, and p.grad (the batch gradient) cannot be clipped "
            "per record: pass them, opt.step(per_sample_grads) with one (B, *p.shape) tensor per parameter in "
            "param-group order (optimlab.per_sample.per_sample_grads computes them), or call "
            "opt.step_batch(model, loss_fn, inputs, targets), or fill p.grad_sample (Opacus's GradSampleModule)"
        )

    def _gather_per_sample(self, per_sample_grads: Any) -> list[tuple[Tensor, Tensor, dict[str, Any]]]:
        """(param, per-sample gradients, group) for every parameter that has them, checked."""
        owned = [(p, group) for group in self.param_groups for p in group["params"]]
        if per_sample_grads is None:
            grads = [getattr(p, "grad_sample", None) for p, _ in owned]
        elif isinstance(per_sample_grads, Mapping):
            raise TypeError(
                "per_sample_grads must be a sequence aligned with the optimizer's parameters, not a mapping; for the "
                "dict of optimlab.per_sample.per_sample_grads use opt.step_batch(...), or pass "
                "[grads[name] for name, p in model.named_parameters() if p.requires_grad]"
            )
        else:
            grads = list(per_sample_grads)
            if len(grads) != len(owned):
                raise ValueError(
                    f"got {len(grads)} per-sample gradient tensors for {len(owned)} parameters; pass one per "
                    "parameter (None for one without a gradient), in param-group order"
                )
        entries = [(p, g, group) for (p, group), g in zip(owned, grads) if g is not None]
        if not entries:
            raise self._missing()
        batches = set()
        for p, g, _ in entries:
            if not isinstance(g, Tensor):
                raise TypeError(f"per-sample gradients must be tensors; got {type(g).__name__}")
            if g.is_sparse or g.layout != torch.strided:
                raise TypeError(f"{type(self).__name__} does not support sparse per-sample gradients; pass dense ones")
            if p.is_complex() or g.is_complex():
                raise TypeError(
                    f"{type(self).__name__} does not support complex parameters; optimize torch.view_as_real(p) as a "
                    "real parameter instead"
                )
            if g.dim() != p.dim() + 1 or g.shape[1:] != p.shape:
                raise ValueError(
                    f"per-sample gradients of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}; "
                    f"expected (B, {', '.join(map(str, p.shape))})"
                )
            batches.add(g.shape[0])
        if len(batches) != 1:
            raise ValueError(f"per-sample gradients with different batch sizes {sorted(batches)}; one batch per step")
        return entries

    def step_batch(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        inputs: Tensor | tuple[Tensor, ...] | list[Tensor],
        targets: Tensor | None = None,
        *,
        chunk_size: int | None = None,
        randomness: str = "different",
    ) -> Tensor:
        """Per-sample gradients of ``loss_fn(model(*inputs), targets)`` by :func:`optimlab.per_sample.
        per_sample_grads_and_losses`, then one :meth:`step`; returns the batch's mean loss (detached, NaN for an
        empty batch). Every parameter of this optimizer must be a trainable parameter of ``model``. The loss is
        computed from private data: it is not privatised, so do not release it."""
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        owned = [p for group in self.param_groups for p in group["params"]]
        strangers = [i for i, p in enumerate(owned) if id(p) not in names]
        if strangers:
            raise ValueError(
                f"parameters {strangers} (in param-group order) of {type(self).__name__} are not trainable "
                "parameters of the model; step_batch differentiates the model's parameters"
            )
        grads, losses = per_sample_grads_and_losses(
            model, loss_fn, inputs, targets, chunk_size=chunk_size, randomness=randomness
        )
        self.step([grads[names[id(p)]] for p in owned])
        return losses.detach().mean()


class DPSGD(PrivateOptimizer):
    __doc__ = __doc__

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.1,
        max_grad_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        expected_batch_size: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _private_update(self, params, per_sample_grads, states, **hyperparameters) -> None:
        dp_sgd_(params, per_sample_grads, **hyperparameters)


# -- the private training loop -----------------------------------------------------------------------------------
@dataclass
class PrivateTrainingResult:
    """What :func:`train_private` returns: the ε spent at δ (for DiceSGD, by the official practice: see
    :mod:`optimlab.privacy.accounting`), the number of steps, and each step's mean batch loss (not private)."""

    epsilon: float
    delta: float
    steps: int
    losses: Tensor
    note: str = ""
    accountant: Any = field(default=None, repr=False)
    # the Poisson sampler's state at the end, to continue the run (train_private(..., sampler_state=...))
    sampler_state: dict[str, Any] | None = field(default=None, repr=False)


def train_private(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    dataset: Any,
    optimizer: PrivateOptimizer,
    *,
    sample_rate: float,
    epochs: int = 1,
    delta: float | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    accountant: Any = None,
    sampler_state: dict[str, Any] | None = None,
) -> PrivateTrainingResult:
    """Train ``model`` privately: ``epochs`` epochs of :func:`~optimlab.privacy.sampling.poisson_loader` batches
    (``int(1/sample_rate)`` per epoch, sampler seeded by ``seed``) of ``dataset`` (records ``(input, target)``),
    per-sample gradients and a step of ``optimizer`` on each (:meth:`PrivateOptimizer.step_batch`), and a
    :class:`~optimlab.privacy.accounting.PrivacyAccountant` step after each. ``delta`` defaults to 1/N.

    ``optimizer.expected_batch_size`` must be set (``sample_rate * len(dataset)`` is Opacus's choice). To continue
    a run, pass its ``accountant`` and ``sampler_state`` (both in the result): the batches then go on where they
    stopped, as the accountant assumes (every step samples afresh; a sampler seeded again would draw the first
    run's batches again). ε is reported at ``delta`` if given, else at the accountant's δ (1/N for a new one).
    Needs Opacus (``pip install optimlab[privacy]``)."""
    from optimlab.privacy.accounting import PrivacyAccountant, check_delta, default_delta
    from optimlab.privacy.sampling import poisson_loader

    if not isinstance(optimizer, PrivateOptimizer):
        raise TypeError(f"train_private needs a private optimizer (DPSGD, DiceSGD); got {type(optimizer).__name__}")
    if optimizer.param_groups[0]["expected_batch_size"] is None:
        raise ValueError(
            "the optimizer's expected_batch_size is None, but Poisson batches vary in size (and can be empty): build "
            f"it with expected_batch_size=sample_rate * len(dataset) = {sample_rate * len(dataset):g}"
        )
    Interval(1, integer=True).check("epochs", epochs)
    delta = None if delta is None else check_delta(delta)
    if accountant is None:
        accountant = PrivacyAccountant(default_delta(len(dataset)) if delta is None else delta)
    elif accountant.steps and sampler_state is None:
        raise ValueError(
            "continuing an accountant that has recorded steps needs the sampler's state too, or the Poisson batches "
            "would start over from the seed and repeat the earlier run's (the accountant assumes fresh sampling at "
            "every step): pass sampler_state=result.sampler_state from the earlier result"
        )
    loader = poisson_loader(dataset, sample_rate, seed=seed)
    if sampler_state is not None:
        loader.batch_sampler.load_state_dict(sampler_state)
    sigma = optimizer.param_groups[0]["noise_multiplier"]
    losses = []
    for _ in range(epochs):
        for inputs, targets in loader:
            losses.append(optimizer.step_batch(model, loss_fn, inputs, targets, chunk_size=chunk_size))
            accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    note = getattr(optimizer, "epsilon_note", "")
    delta = accountant.delta if delta is None else delta
    return PrivateTrainingResult(
        epsilon=accountant.epsilon(delta),
        delta=delta,
        steps=accountant.steps,
        losses=torch.stack(losses) if losses else torch.empty(0),
        note=note,
        accountant=accountant,
        sampler_state=loader.batch_sampler.state_dict(),
    )


# The battery drives optimizers through p.grad; these take per-sample gradients. Only the checks the battery lets a
# method opt out of are listed (the others cannot be exempted: see the report on the battery).
# the battery drives these optimizers with each gradient as a batch of one example (p.grad_sample); what cannot
# hold for a private optimizer:
PRIVATE_EXEMPTIONS = {
    "param_groups": "a record's clipping norm runs over all parameters of all groups (the privacy unit is the record), "
    "so separate optimizers per group clip differently by design; tests/privacy checks per-group learning rates",
    "missing_gradients": "the clipping norm and the noise couple every parameter of the step; a parameter without "
    "per-sample gradients is skipped (tests/privacy checks it), but the others' steps depend on which are present",
    "convergence": "the Gaussian noise (noise_multiplier 1 by default) keeps the iterates in a noise ball, not at the "
    "optimum; with noise 0 and infinite thresholds the step is plain SGD (tests/privacy)",
    "grad_scaler": "GradScaler unscales p.grad only, so per-sample gradients would be clipped at the loss scale: "
    "refused with a TypeError (tests/privacy)",
}
PRIVATE_HYPERPARAMETERS = {
    "lr": NON_NEGATIVE,
    "max_grad_norm": POSITIVE,
    "noise_multiplier": NOISE_MULTIPLIER,
    "seed": SEED,
}

register(
    MethodInfo(
        name="dp_sgd",
        cls=DPSGD,
        kind="optimizer",
        paper="Deep Learning with Differential Privacy",
        arxiv="1607.00133",
        code_url="https://github.com/pytorch/opacus",
        summary="per-sample gradients clipped over all parameters, summed, Gaussian noise added (DP-SGD-GC); "
        "takes per-sample gradients, not p.grad",
        hyperparameters=PRIVATE_HYPERPARAMETERS,
        lr_range=(1e-3, 1.0),
        capabilities=Capabilities(per_sample_grads=True, global_state=True, stochastic=True, compilable=False),
        exemptions=PRIVATE_EXEMPTIONS,
        batch_scaling="linear",
        advice="Calibrate noise_multiplier with optimlab.privacy.noise_multiplier_for; set expected_batch_size = "
        "sample_rate * N under Poisson sampling; step(per_sample_grads) or step_batch(model, loss_fn, x, y).",
    )
)
