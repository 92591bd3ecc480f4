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

from optimlab._core.kernels import add, add_, addcdiv_, addcmul_, kernel
from optimlab._core.optimizer import OptimlabOptimizer
from optimlab._core.validation import Choice, adam_family
from optimlab.registry import MethodInfo, register

__all__ = ["DiffGrad", "diffgrad_", "diffgrad_update", "FRICTIONS"]


FRICTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "abs": lambda prev, g: torch.sub(prev, g).abs_().sigmoid_(),
    "signed": lambda prev, g: torch.sub(prev, g).sigmoid_(),
    "scaled": lambda prev, g: torch.sub(prev, g).abs_().mul_(0.5).sigmoid_().mul_(9).sub_(4),
}


@kernel(read_only=("g",))
def diffgrad_update(p: Tensor, g: Tensor, prev: Tensor, m: Tensor, v: Tensor, scalars: Any, *, friction: str) -> None:
    """One tensor's diffGrad update, in place; ``scalars`` as made by ``diffgrad_``."""
    beta1, beta2, c1, c2, eps, step_size, weight_decay = scalars
    g = add(g, p, weight_decay)
    add_(m.mul_(beta1), g, c1)
    addcmul_(v.mul_(beta2), g, g, c2)
    xi = FRICTIONS[friction](prev, g)
    prev.copy_(g)
    denom = v.sqrt().add_(eps)
    addcdiv_(p, xi.mul_(m), denom, -step_size)


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
    for p, g, state in zip(params, grads, states):
        state["step"] += 1
        t = state["step"]
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        diffgrad_update(
            p, g, state["prev_grad"], state["exp_avg"], state["exp_avg_sq"],
            scalars=(beta1, beta2, 1 - beta1, 1 - beta2, eps, step_size, weight_decay), friction=friction,
        )


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
        super().__init__(params, self._defaults_from_arguments(locals()))

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
        batch_scaling="sqrt",
        advice="Adam's learning rate; weight decay is L2 (coupled), so use a smaller value than AdamW's.",
    )
)
