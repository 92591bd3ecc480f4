r"""Adan: Adaptive Nesterov Momentum Algorithm.

Paper: Xie, Zhou, Li, Lin, Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
Models", arXiv `2208.06677 <https://arxiv.org/abs/2208.06677>`_ (TPAMI 2024).
Official code: https://github.com/sail-sg/Adan (``adan.py``); optimlab follows its semantics.

Update, per parameter tensor, with the betas as *decay rates* like torch's (the paper's
:math:`\beta^{paper} = 1-\beta`), a per-parameter step count :math:`t`, and :math:`g_0 := g_1`:

.. math::

    \Delta_t &= g_t - g_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, \Delta_t \\
    n_t &= \beta_3 n_{t-1} + (1-\beta_3)\, (g_t + \beta_2 \Delta_t)^2 \\
    u_t &= \frac{m_t/(1-\beta_1^t) + \beta_2\, v_t/(1-\beta_2^t)}{\sqrt{n_t/(1-\beta_3^t)} + \epsilon} \\
    \theta_t &= \frac{\theta_{t-1} - \eta\, u_t}{1 + \eta\lambda}
        \quad\text{(proximal decay, default)}

With ``no_prox=True`` the decay is decoupled instead:
:math:`\theta_t = (1-\eta\lambda)\,\theta_{t-1} - \eta\, u_t`.

With ``max_grad_norm`` :math:`C > 0`, every gradient is first scaled by
:math:`\min(1, C/(\lVert g\rVert + \epsilon))`, the norm taken over all parameters of all groups (as the
official code does); :math:`g_{t-1}` is the clipped gradient. ``restart()`` zeroes the moments and the step
count (the official ``restart_opt``); ``restart_every`` :math:`>0` does so every that many steps.

Hyperparameters (defaults): ``lr`` 1e-3, ``betas`` (0.98, 0.92, 0.99), ``eps`` 1e-8, ``weight_decay`` 0.0,
``max_grad_norm`` 0.0 (off), ``no_prox`` False, ``restart_every`` 0 (off).

Coming from AdamW: the authors' tip is a peak learning rate 5-10x AdamW's; their recipes use
``weight_decay`` 0.02 with the proximal form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimlab._core.kernels import add_, addcmul_, div_, kernel, mul_
from optimlab._core.optimizer import OptimlabOptimizer, state_dtype
from optimlab._core.validation import NON_NEGATIVE, Flag, Interval, adam_family
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = ["Adan", "adan_", "adan_update"]

@kernel(read_only=("g",))
def adan_update(p: Tensor, g: Tensor, prev: Tensor, m: Tensor, v: Tensor, n: Tensor, scalars: Any) -> None:
    """One tensor's Adan update, in place; ``scalars`` as made by ``adan_``."""
    beta1, beta2, beta3, c1, c2, c3, bc1, beta2_bc2, sqrt_bc3, eps, lr, shrink, divide = scalars
    diff = g - prev
    add_(m.mul_(beta1), g, c1)
    add_(v.mul_(beta2), diff, c2)
    lookahead = diff.mul_(beta2).add_(g)
    addcmul_(n.mul_(beta3), lookahead, lookahead, c3)
    denom = n.sqrt().div_(sqrt_bc3).add_(eps)
    update = add_(m.div(bc1), v, beta2_bc2).div_(denom)
    div_(add_(mul_(p, shrink), update, -lr), divide)
    prev.copy_(g)


def adan_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float, float],
    eps: float,
    weight_decay: float,
    no_prox: bool,
    restart_every: int = 0,
    grad_scale: Tensor | None = None,
) -> None:
    """Functional Adan: update ``params`` and ``states`` in place (``grads`` are only read).

    Each state holds ``step`` (int), ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq`` and ``prev_grad``.
    ``grad_scale`` (a 0-dim tensor) multiplies every gradient first: the global clipping factor.
    """
    beta1, beta2, beta3 = betas
    # the decay as p <- (shrink * p - lr * u) / divide; multiplying or dividing by 1.0 is exact
    shrink, divide = (1 - lr * weight_decay, 1.0) if no_prox else (1.0, 1 + lr * weight_decay)
    for p, g, state in zip(params, grads, states):
        if grad_scale is not None:
            g = g * grad_scale
        state["step"] += 1
        t = state["step"]
        if t == 1:
            state["prev_grad"].copy_(g)
        bias = (1 - beta1**t, beta2 / (1 - beta2**t), math.sqrt(1 - beta3**t))
        adan_update(
            p, g, state["prev_grad"], state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"],
            scalars=(beta1, beta2, beta3, 1 - beta1, 1 - beta2, 1 - beta3, *bias, eps, lr, shrink, divide),
        )
        if restart_every and t % restart_every == 0:
            _reset(state)


def _reset(state: dict[str, Any]) -> None:
    for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq"):
        state[key].zero_()
    state["step"] = 0


class Adan(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(adan_)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        no_prox: bool = False,
        restart_every: int = 0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {
            "step": 0,
            "exp_avg": self._zeros(p),
            "exp_avg_diff": self._zeros(p),
            "exp_avg_sq": self._zeros(p),
            "prev_grad": self._zeros(p),
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "max_grad_norm" in param_group and param_group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ValueError(
                f"Invalid max_grad_norm: {param_group['max_grad_norm']!r} in a param group; expected the "
                "constructor's value (the clip is one norm over all groups: set it in the constructor)"
            )
        super().add_param_group(param_group)

    def _apply(self, batches: list) -> None:
        self._grad_scale = None
        max_norm = self.defaults["max_grad_norm"]
        if max_norm > 0 and batches:
            norms = [torch.linalg.vector_norm(g, dtype=state_dtype(g)) for _, _, grads, _ in batches for g in grads]
            dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, dtype) for n in norms]))
            self._grad_scale = (max_norm / (total + self.defaults["eps"])).clamp_(max=1.0)
        super()._apply(batches)

    def _core_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._core_arguments(group), "grad_scale": self._grad_scale}

    @torch.no_grad()
    def restart(self) -> None:
        """Zero the moments and step counts (the official ``restart_opt``); the next step re-seeds g_prev."""
        for state in self.state.values():
            if state:
                _reset(state)


register(
    MethodInfo(
        name="adan",
        cls=Adan,
        kind="optimizer",
        paper="Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models",
        arxiv="2208.06677",
        code_url="https://github.com/sail-sg/Adan",
        summary="Adam-type method with Nesterov momentum estimated from gradient differences",
        hyperparameters={
            **adam_family(betas=3),
            "max_grad_norm": NON_NEGATIVE,
            "no_prox": Flag(),
            "restart_every": Interval(0, integer=True),
        },
        lr_range=(5e-4, 5e-1),
        batch_scaling="sqrt",
        capabilities=Capabilities(global_state=True),
        advice="Peak learning rate 5-10x AdamW's (authors' tip); weight decay 0.02 with the proximal form.",
    )
)
