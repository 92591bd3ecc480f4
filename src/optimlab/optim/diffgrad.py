r"""diffGrad: Adam whose first moment is damped by a friction from the change of the gradient.

Paper: Dubey, Chakraborty, Roy, Mukherjee, Singh, Chaudhuri, "diffGrad: An Optimization Method for
Convolutional Neural Networks", IEEE TNNLS 31(11), 2020, arXiv `1909.11015 <https://arxiv.org/abs/1909.11015>`_.
Official code: https://github.com/shivram1987/diffGrad (``diffGrad_v2.py``, the fixed version its README
recommends); optimlab follows it.

Update, per parameter tensor with step count :math:`t` and :math:`g_0 := 0`:

.. math::

    g &\leftarrow g + \lambda\theta \qquad\text{(L2 decay, as in the official code)} \\
    m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    \xi &= \sigma(\lvert g_{t-1} - g_t\rvert) \in [\tfrac12, 1) \qquad\text{(friction)} \\
    \theta &\leftarrow \theta - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{\xi\, m}{\sqrt{v}+\epsilon}

:math:`g_{t-1}` stores the decayed gradient of the previous step. ``friction`` selects the friction
coefficient: ``"abs"`` is the paper's :math:`\sigma(\lvert\Delta g\rvert)`; ``"signed"``
(:math:`\sigma(g_{t-1}-g_t)`, in (0, 1)) and ``"scaled"`` (:math:`9\sigma(\lvert\Delta g\rvert/2)-4`, in
[0.5, 5)) are the non-paper variants 1 and 2 of lessw2020's Best-Deep-Learning-Optimizers collection.

Hyperparameters (defaults): ``lr`` 1e-3, ``betas`` (0.9, 0.999), ``eps`` 1e-8, ``weight_decay`` 0.0,
``friction`` ``"abs"``.

Coming from AdamW: Adam's learning rate; the friction halves steps where the gradient is steady. The decay is
L2 (coupled), not decoupled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optimlab._core.optimizer import OptimlabOptimizer
from optimlab._core.validation import Choice, adam_family
from optimlab.registry import MethodInfo, register

__all__ = ["DiffGrad", "diffgrad_", "FRICTIONS"]


FRICTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "abs": lambda prev, g: torch.sub(prev, g).abs_().sigmoid_(),
    "signed": lambda prev, g: torch.sub(prev, g).sigmoid_(),
    "scaled": lambda prev, g: torch.sub(prev, g).abs_().mul_(0.5).sigmoid_().mul_(9).sub_(4),
}


def diffgrad_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    friction: str = "abs",
) -> None:
    """Functional diffGrad: update ``params`` and ``states`` (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``prev_grad``) in place."""
    beta1, beta2 = betas
    friction_of = FRICTIONS[friction]
    for p, g, state in zip(params, grads, states):
        m, v, prev = state["exp_avg"], state["exp_avg_sq"], state["prev_grad"]
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        state["step"] += 1
        t = state["step"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        xi = friction_of(prev, g)
        prev.copy_(g)
        denom = v.sqrt().add_(eps)
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p.addcdiv_(xi.mul_(m), denom, value=-step_size)


class DiffGrad(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(diffgrad_)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        friction: str = "abs",
    ) -> None:
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, friction=friction)
        )

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0, "exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p), "prev_grad": self._zeros(p)}



register(
    MethodInfo(
        name="diffgrad",
        cls=DiffGrad,
        kind="optimizer",
        paper="diffGrad: An Optimization Method for Convolutional Neural Networks",
        arxiv="1909.11015",
        code_url="https://github.com/shivram1987/diffGrad",
        summary="Adam with a per-coordinate friction from the change of the gradient",
        hyperparameters={
            **adam_family(betas=2),
            "friction": Choice(tuple(FRICTIONS)),
        },
        lr_range=(1e-4, 1e-1),
        advice="Adam's learning rate; weight decay is L2 (coupled), so use a smaller value than AdamW's.",
    )
)
