r"""SSO: stochastic surrogate optimisation, an SGD step in target (output) space fitted by m cheap inner steps.

Paper: Lavington, Vaswani, Babanezhad, Schmidt, Le Roux, "Target-based Surrogates for Stochastic
Optimization", ICML 2023 (PMLR 202), arXiv `2302.02607 <https://arxiv.org/abs/2302.02607>`_. Official code:
https://github.com/WilderLavington/Target-Based-Surrogates-For-Stochastic-Optimization
(``optimizers/sgd_fmdopt.py``, the method; ``optimizers/lsopt.py``, its inner Armijo line search).

For a model :math:`f(\theta; X)` and a loss :math:`L(z)` of the model's outputs :math:`z` (for instance
:math:`L(z) = \ell(z, y)` on a batch :math:`(X_t, y_t)`), outer step :math:`t` evaluates the outputs and the
loss's gradient with respect to them *once*,

.. math::

    z_t = f(\theta_t; X_t), \qquad G_t = \nabla_z L(z_t),

takes the SGD step :math:`z_t - \eta G_t` in target space, and moves the parameters towards it by minimising
the paper's surrogate

.. math::

    h_t(\theta) = \langle G_t, f(\theta; X_t) - z_t\rangle + \frac{1}{2\eta}\lVert f(\theta; X_t) - z_t\rVert^2,

whose minimiser over the outputs is :math:`z_t - \eta G_t`, with ``inner_steps`` :math:`m` steps of gradient
descent on the same batch, each with an Armijo backtracking line search. The inner steps need only forward and
backward passes through the model, never the loss again (the point of the method when :math:`\nabla_z L` is
expensive: reinforcement learning, imitation, adversarial losses).

**Scale of the surrogate (the official code's convention).** The inner loop minimises

.. math::

    s_t(\theta) = \frac{2\eta}{N}\,h_t(\theta)
                = \frac1N\Bigl(2\eta\langle G_t, f - z_t\rangle + \lVert f - z_t\rVert^2\Bigr)
                = \frac1N\lVert f(\theta; X_t) - (z_t - \eta G_t)\rVert^2 - \frac{\eta^2}{N}\lVert G_t\rVert^2,

:math:`N` the number of output elements: a mean-squared-error regression of the outputs onto the target step,
with the same minimisers as :math:`h_t` and :math:`s_t(\theta_t) = 0`. It is exactly the official code's
surrogate, ``mean(G ⊙ f / eta_c + (f − z)^2)``, with :math:`\eta = 1/(2\,\eta_c)`: the code's ``eta``
:math:`\eta_c` is the inverse of its "step size" :math:`1/\eta_c`, and its target step is
:math:`z_t - G_t/(2\eta_c)` (the factor 2). So a run of the official code with step size :math:`1/\eta_c` is
``lr = 1/(2 eta_c)`` here, with the same inner step sizes. (Its "optimal" step sizes 1/4 for squared error, 2
for binary logistic and :math:`1/(1-1/K)` for K-class cross entropy are ``lr`` 1/8, 1 and
:math:`1/(2(1-1/K))`.) One plain gradient step of size :math:`\alpha` on :math:`s_t` is an SGD step with
learning rate :math:`2\alpha\eta/N` on :math:`L`, because :math:`\nabla s_t(\theta_t) = \frac{2\eta}{N}
\nabla_\theta L(f(\theta_t))`: with ``inner_steps=1`` SSO is SGD with the Armijo step size.

**Inner loop** (as ``lsopt.py``): the trial step starts at ``inner_lr`` (reset every outer step; the official
``reset_lr_on_step`` default, 10) and before each inner step is multiplied by ``expansion``; a trial
:math:`\theta - \alpha g`, :math:`g = \nabla s_t(\theta)`, is accepted when

.. math::

    s_t(\theta - \alpha g) \le s_t(\theta) - c\,\alpha\,\lVert g\rVert^2

(one sum over all parameters), otherwise :math:`\alpha \leftarrow \text{backtrack}\cdot\alpha`; at most 100
trials and :math:`\alpha \ge 10^{-6}`. The accepted :math:`\alpha` carries over to the next inner step. The
inner loop stops early when :math:`\lVert g\rVert \le 10^{-6}`. *Deviation:* when no trial is accepted the
official code still moves by the last (untested) step; here the parameters stay put, so the inner loop never
increases the surrogate. The code's expansion is ``expand_coeff ** (1 / batches_per_epoch)``; ``expansion`` is
that per-inner-step factor itself (2.0, the full-batch value, by default). Schedules of :math:`\eta` (the code's
``'stochastic'`` :math:`\eta_c\sqrt t`, ``'exponential'``) are LR schedulers on ``lr`` here.

Hyperparameters (defaults): ``lr`` :math:`\eta` 1.0 (the target-space step; for a loss that is
:math:`\beta`-smooth in the outputs, :math:`\eta \le 1/\beta` makes the target step a descent step),
``inner_steps`` :math:`m` 5 (``parser.py``; the paper sweeps 1, 5, 10, 100), ``inner_lr`` 10.0, ``c`` 0.1,
``backtrack`` 0.9, ``expansion`` 2.0. They describe one surrogate over all parameters, so every param group
must hold the same values (groups only select the parameters to train).

**The closure.** ``step(closure)`` is required. ``closure()`` takes no argument and returns
``(outputs, loss_fn)``: ``outputs`` the model's outputs on the current batch, recomputed on every call (the inner
steps call it again on the same batch, with and without gradients, so it must be deterministic: no dropout
or batch-norm updates), and ``loss_fn`` a function of outputs to a scalar loss, called once per step at
:math:`z_t`. The closure must not call ``backward``; ``step`` takes gradients with ``torch.autograd.grad`` and
leaves ``p.grad`` alone. ``step`` returns the loss at :math:`\theta_t`::

    opt = SSO(model.parameters(), lr=1.0, inner_steps=5)
    for X, y in loader:
        def closure():
            return model(X), lambda out: F.cross_entropy(out, y, reduction="sum")
        loss = opt.step(closure)

The line search decides on the host (one synchronisation per trial), as any backtracking line search does.

Coming from AdamW: ``lr`` is a step in output space, not in parameter space (about the inverse smoothness of
the loss in the outputs), and the inner line search sets the parameter-space step; tune ``inner_steps`` (more
inner steps amortise one expensive loss gradient over more parameter updates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optimlab._core.optimizer import OptimlabOptimizer, as_float, state_dtype
from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Interval
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = ["SSO", "armijo_step_", "sso_surrogate"]

_MIN_STEP = 1e-6  # lsopt.py: stop backtracking below this step size
_MAX_TRIALS = 100  # lsopt.py: at most this many trial points per inner step
_FLAT_GRADIENT = 1e-6  # sgd_fmdopt.py: stop the inner loop once the surrogate's gradient norm is this small
_SHARED = ("lr", "inner_steps", "inner_lr", "c", "backtrack", "expansion")

Closure = Callable[[], tuple[Tensor, Callable[[Tensor], Tensor]]]


def _squared_norm(tensors: list[Tensor]) -> float:
    """The squared norm of the concatenated tensors, in float64, as a Python float (one sync per tensor)."""
    return sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors)


def sso_surrogate(outputs: Tensor, target: Tensor, grad: Tensor, *, eta: float) -> Tensor:
    """:math:`s_t = \\frac1N(2\\eta\\langle G, f - z\\rangle + \\lVert f - z\\rVert^2)` for outputs ``f``, the
    outer step's outputs ``z = target`` and loss gradient ``G = grad``; computed in at least float32."""
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    diff = outputs.to(dtype) - target.to(dtype)
    return (diff * (grad.to(dtype) * (2 * eta) + diff)).sum() / max(outputs.numel(), 1)


def armijo_step_(
    params: list[Tensor],
    grads: list[Tensor],
    value: Tensor,
    evaluate: Callable[[], Tensor],
    *,
    step_size: float,
    c: float,
    backtrack: float,
) -> tuple[float, bool]:
    """One backtracking gradient step on the function ``evaluate`` (of ``params``), in place.

    ``value`` and ``grads`` are the function and its gradient at the current ``params``. Tries
    :math:`\\theta - \\alpha g` for :math:`\\alpha` = ``step_size``, ``step_size * backtrack``, ... and keeps the
    first that satisfies the Armijo condition :math:`\\phi(\\theta - \\alpha g) \\le \\phi(\\theta) - c\\alpha
    \\lVert g\\rVert^2`; if none does (100 trials, or :math:`\\alpha < 10^{-6}`), restores ``params``. Returns
    ``(alpha, accepted)``; 16-bit parameters step from a float32 copy.
    """
    start = [p.detach().to(state_dtype(p), copy=True) for p in params]
    grads = [g.to(s.dtype) for g, s in zip(grads, start)]
    sq_norm = _squared_norm(grads)
    threshold = float(value)
    for _ in range(_MAX_TRIALS):
        for p, s, g in zip(params, start, grads):
            p.copy_(torch.add(s, g, alpha=-step_size))
        if float(evaluate()) <= threshold - c * step_size * sq_norm:
            return step_size, True
        step_size *= backtrack
        if step_size < _MIN_STEP:
            break
    for p, s in zip(params, start):
        p.copy_(s)
    return step_size, False


class SSO(OptimlabOptimizer):
    __doc__ = __doc__
    shared_hyperparameters = _SHARED  # one surrogate over all parameters

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        inner_steps: int = 5,
        inner_lr: float = 10.0,
        c: float = 0.1,
        backtrack: float = 0.9,
        expansion: float = 2.0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _hyperparameters(self) -> dict[str, Any]:
        hp = self._shared()
        hp["lr"] = as_float(hp["lr"])
        return hp

    @staticmethod
    def _outputs(closure: Closure) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        result = closure()
        if not (
            isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Tensor) and callable(result[1])
        ):
            raise TypeError(
                "SSO's closure must return (outputs, loss_fn): the model's outputs on the batch and a function "
                f"of outputs to the scalar loss; got {type(result).__name__}"
            )
        return result

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One outer SSO step on the batch the closure evaluates; returns the loss before the step.

        ``closure() -> (outputs, loss_fn)``: see the class docstring.
        """
        if closure is None:
            raise RuntimeError(
                "SSO needs a closure: opt.step(closure) with closure() returning (outputs, loss_fn), e.g. "
                "lambda: (model(X), lambda out: loss(out, y)); see the SSO docstring"
            )
        hp = self._hyperparameters()
        eta = hp["lr"]
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        for p in params:
            if p.is_complex():
                raise TypeError("SSO does not support complex parameters; optimize torch.view_as_real(p) instead")

        with torch.enable_grad():
            outputs, loss_fn = self._outputs(closure)
            if not outputs.requires_grad:
                raise RuntimeError(
                    "the closure's outputs do not depend on the parameters: compute them with gradients enabled "
                    "(the closure must not run under torch.no_grad) from the parameters given to SSO"
                )
            target = outputs.detach()
            z = target.clone().requires_grad_(True)
            loss = loss_fn(z)
            if not (isinstance(loss, Tensor) and loss.numel() == 1):
                raise TypeError(f"loss_fn must return a scalar tensor; got {type(loss).__name__}")
            (grad_z,) = torch.autograd.grad(loss, z)
            grad_z = grad_z.detach()
            # s_t at theta_t is 0 and its gradient is (2 eta / N) J^T G: one backward through the outer forward
            scale = 2 * eta / max(target.numel(), 1)
            grads = self._grads(
                torch.autograd.grad(outputs, params, grad_outputs=grad_z * scale, allow_unused=True), params
            )
        value = torch.zeros((), dtype=torch.promote_types(target.dtype, torch.float32), device=target.device)

        def surrogate() -> Tensor:
            out, _ = self._outputs(closure)
            if out.shape != target.shape:
                raise RuntimeError(
                    f"the closure's outputs changed shape within a step: {tuple(target.shape)} -> {tuple(out.shape)}"
                )
            return sso_surrogate(out, target, grad_z, eta=eta)

        step_size = hp["inner_lr"]
        for inner in range(hp["inner_steps"]):
            if inner > 0:
                with torch.enable_grad():
                    value = surrogate()
                    grads = self._grads(torch.autograd.grad(value, params, allow_unused=True), params)
            if math.sqrt(_squared_norm(grads)) <= _FLAT_GRADIENT:
                break
            step_size, _ = armijo_step_(
                params,
                grads,
                value,
                surrogate,
                step_size=step_size * hp["expansion"],
                c=hp["c"],
                backtrack=hp["backtrack"],
            )

        if params:
            state = self.state[params[0]]
            state["step"] = state.get("step", 0) + 1
        return loss.detach()

    @staticmethod
    def _grads(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
        # a parameter the outputs do not use has gradient zero, not None
        return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


register(
    MethodInfo(
        name="sso",
        cls=SSO,
        kind="optimizer",
        paper="Target-based Surrogates for Stochastic Optimization",
        arxiv="2302.02607",
        code_url="https://github.com/WilderLavington/Target-Based-Surrogates-For-Stochastic-Optimization",
        summary="an SGD step in output space, fitted by m Armijo line-search steps on a surrogate that reuses one "
        "loss gradient",
        hyperparameters={
            "lr": NON_NEGATIVE,
            "inner_steps": Interval(1, integer=True),
            "inner_lr": POSITIVE,
            "c": Interval(0.0, 1.0, low_closed=False, high_closed=False),
            "backtrack": Interval(0.0, 1.0, low_closed=False, high_closed=False),
            "expansion": Interval(1.0),
        },
        lr_range=(1e-2, 1e2),
        capabilities=Capabilities(needs_closure=True, global_state=True, compilable=False),
        advice="lr is the step in output space (about 1/smoothness of the loss in the outputs; the official "
        "runs' values are 1/8 for squared error and 1 for binary logistic loss), not a parameter-space lr; the "
        "closure returns (outputs, loss_fn).",
    )
)
