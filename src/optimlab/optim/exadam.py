r"""EXAdam: Adam with cross-moment debiasing and gradient acceleration.

Paper: Adly, "EXAdam: The Power of Adaptive Cross-Moments", arXiv
`2412.20302 <https://arxiv.org/abs/2412.20302>`_. Official code: https://github.com/AhmedMostafa16/EXAdam
(optimlab follows its current head; the head file as published fails on construction, ``np`` being no longer
imported, so it cannot serve as a test oracle).

Update, per parameter tensor with step count :math:`t` and bias corrections
:math:`b_1 = 1-\beta_1^t`, :math:`b_2 = 1-\beta_2^t`:

.. math::

    \theta &\leftarrow \theta - \eta\lambda\,\theta \qquad\text{(decoupled decay, with the base } \eta\text{)} \\
    m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    d_1 &= 1 + \beta_2^t\,\frac{v}{v+\epsilon}, \qquad d_2 = 1 + \beta_1^t\,\frac{m^2}{m^2+\epsilon} \\
    \tilde m &= d_1 m / b_1, \quad \tilde v = d_2 v / b_2, \quad \tilde g = d_1 g / b_1 \\
    \theta &\leftarrow \theta - \eta_t\,\frac{\tilde m + \tilde g}{\sqrt{\tilde v} + \epsilon}

with :math:`\eta_t = \eta` by default (paper v2, official head) and
:math:`\eta_t = \eta \ln\sqrt{2(t+1)}` with ``dynamic_lr=True`` (paper v1's growing step).
The first step is about 16x an Adam step (15.9522·η for the default betas).

Hyperparameters (defaults): ``lr`` 1e-3, ``betas`` (0.9, 0.999), ``eps`` 1e-8, ``weight_decay`` 0.0,
``dynamic_lr`` False.

Coming from AdamW: the author recommends lr 1e-3 / weight decay 1e-4 for vision and 3e-4 / 1e-5 for language;
the learning rate is on Adam's scale, but mind the large first steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimlab._core.kernels import add_, addcdiv_, addcmul_, kernel, mul_
from optimlab._core.optimizer import OptimlabOptimizer
from optimlab._core.validation import Flag, adam_family
from optimlab.registry import MethodInfo, register

__all__ = ["EXAdam", "exadam_", "exadam_update"]

@kernel(read_only=("g",))
def exadam_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Any) -> None:
    """One tensor's EXAdam update, in place; ``scalars`` as made by ``exadam_``."""
    beta1, beta2, c1, c2, beta1_t, beta2_t, bc1, bc2, eps, step_size, shrink = scalars
    mul_(p, shrink)
    add_(m.mul_(beta1), g, c1)
    addcmul_(v.mul_(beta2), g, g, c2)
    d1 = torch.div(v, v + eps).mul_(beta2_t).add_(1)
    m_sq = m * m
    d2 = m_sq.div_(m_sq + eps).mul_(beta1_t).add_(1)
    denom = d2.mul_(v).div_(bc2).sqrt_().add_(eps)
    numer = torch.add(m, g).mul_(d1).div_(bc1)
    addcdiv_(p, numer, denom, -step_size)


def exadam_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    dynamic_lr: bool,
) -> None:
    """Functional EXAdam: update ``params`` and ``states`` (``step``, ``exp_avg``, ``exp_avg_sq``) in place."""
    beta1, beta2 = betas
    for p, g, state in zip(params, grads, states):
        state["step"] += 1
        t = state["step"]
        step_size = lr * math.log(math.sqrt(2 * (t + 1))) if dynamic_lr else lr
        exadam_update(
            p, g, state["exp_avg"], state["exp_avg_sq"],
            scalars=(beta1, beta2, 1 - beta1, 1 - beta2, beta1**t, beta2**t, 1 - beta1**t, 1 - beta2**t, eps,
                     step_size, 1 - lr * weight_decay),
        )


class EXAdam(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(exadam_)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dynamic_lr: bool = False,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0, "exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p)}



register(
    MethodInfo(
        name="exadam",
        cls=EXAdam,
        kind="optimizer",
        paper="EXAdam: The Power of Adaptive Cross-Moments",
        arxiv="2412.20302",
        code_url="https://github.com/AhmedMostafa16/EXAdam",
        summary="Adam with cross-moment debiasing and a gradient-acceleration term",
        hyperparameters={
            **adam_family(betas=2),
            "dynamic_lr": Flag(),
        },
        lr_range=(1e-4, 1e-1),
        batch_scaling="sqrt",
        advice="Adam's learning-rate scale (author: 1e-3 vision, 3e-4 language); first steps are ~16x Adam's.",
    )
)
