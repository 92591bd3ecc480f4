r"""Lion and the Lion-𝒦 family: sign-like updates of an interpolated momentum, with decoupled decay.

Papers: Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv
`2302.06675 <https://arxiv.org/abs/2302.06675>`_ (official code:
https://github.com/google/automl/tree/master/lion); Chen, Liu, Liang, Liu, "Lion Secretly Solves Constrained
Optimization, As Lyapunov Predicts", arXiv `2310.05898 <https://arxiv.org/abs/2310.05898>`_ (no official code).

Lion-𝒦 replaces the sign of Lion by the gradient of a convex function 𝒦. Per parameter tensor:

.. math::

    c &= \beta_1 m + (1-\beta_1)\, g \\
    \theta &\leftarrow (1-\eta\lambda)\,\theta - \eta\, \nabla\mathcal K(c) \\
    m &\leftarrow \beta_2 m + (1-\beta_2)\, g

(the step uses the momentum *before* its refresh). With decay :math:`\lambda>0` the iterates solve
:math:`\min_\theta f(\theta) + \tfrac1\lambda \mathcal K^*(\lambda\theta)`, i.e. a constraint for norm-like 𝒦;
started inside the set with :math:`\eta\lambda \le 1` they never leave it.

The choices of ``kappa``, with :math:`\nabla\mathcal K(c)` and the constraint or regulariser it induces
with decay :math:`\lambda`:

- ``"sign"`` (Lion): :math:`\operatorname{sign}(c)`; box :math:`\lVert\theta\rVert_\infty \le 1/\lambda`.
- ``"l2"``: :math:`c/\lVert c\rVert_2` per tensor; ball :math:`\lVert\theta\rVert_2 \le 1/\lambda`.
- ``"lp"``: :math:`\operatorname{sign}(c)\lvert c\rvert^{p-1}/\lVert c\rVert_p^{p-1}`;
  :math:`\lVert\theta\rVert_q \le 1/\lambda` with :math:`1/p + 1/q = 1`.
- ``"huber"``: :math:`\operatorname{clip}(c/\delta, -1, 1)`; box :math:`\lVert\theta\rVert_\infty \le 1/\lambda`
  plus :math:`\tfrac{\lambda\delta}{2}\lVert\theta\rVert_2^2`.
- ``"quadratic"``: :math:`c` (momentum SGD); :math:`\tfrac{\lambda}{2}\lVert\theta\rVert_2^2` (plain L2).
- ``"nuclear"``: :math:`UV^\top` of :math:`c = U\Sigma V^\top` (Muon-like); spectral norm
  :math:`\lVert\theta\rVert_{op} \le 1/\lambda`.

Norm-based 𝒦 act per parameter tensor; ``"nuclear"`` views a tensor as the matrix ``(shape[0], -1)`` (a
vector as one row), as Muon does, and keeps only directions with nonzero singular values; a zero ``c`` gives a
zero step for every 𝒦. ``sign(0) = 0``; unlike ``torch.sign`` (and the official code), a NaN stays NaN, so a
non-finite gradient shows in the parameters instead of silently freezing the coordinate.

Hyperparameters (defaults): ``lr`` 1e-4, ``betas`` (0.9, 0.99), ``weight_decay`` 0.0; LionK adds
``kappa`` ``"sign"``, ``norm_p`` 2.0 (for ``"lp"``), ``huber_delta`` 1.0 (for ``"huber"``).

Coming from AdamW (the authors' advice): a learning rate 3-10x smaller and a weight decay 3-10x larger, so that
the effective decay :math:`\eta\lambda` stays similar; betas (0.95, 0.98) help stability at scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optimlab._core.kernels import add, add_, kernel, mul_
from optimlab._core.optimizer import OptimlabOptimizer
from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Choice, Each, Interval
from optimlab.registry import MethodInfo, register

__all__ = ["Lion", "LionK", "lion_k_", "lion_k_update", "KAPPAS"]

_BETA = Interval(0.0, 1.0)


def _sign(c: Tensor) -> Tensor:
    # torch.sign(nan) is 0, which would freeze a coordinate silently behind a NaN momentum
    return torch.where(c != c, c, c.sign())  # c != c: NaN (vectorizes where isnan does not)


def _l2(c: Tensor, **_: float) -> Tensor:
    return c.div_(torch.linalg.vector_norm(c).clamp_min_(torch.finfo(c.dtype).tiny))


def _lp(c: Tensor, *, norm_p: float, **_: float) -> Tensor:
    # sign(c)|c|^(p-1) / ||c||_p^(p-1), scaled by max|c| first so that the powers cannot overflow; the norm of a
    # scaled nonzero c is >= 1, so the clamp acts only for c = 0 (a zero step, not 0/0)
    tiny = torch.finfo(c.dtype).tiny
    scaled = c.div_(c.abs().amax().clamp_min_(tiny))
    norm = torch.linalg.vector_norm(scaled, ord=norm_p)
    return scaled.abs().pow_(norm_p - 1).mul_(scaled.sign()).div_(norm.pow(norm_p - 1).clamp_min_(tiny))


def _nuclear(c: Tensor, **_: float) -> Tensor:
    matrix = c.reshape(c.shape[0], -1) if c.dim() >= 2 else c.reshape(1, -1)
    # SVD refuses non-finite input; decompose a finite stand-in and let NaN propagate like every other κ
    finite = torch.isfinite(matrix).all()
    u, s, vh = torch.linalg.svd(torch.where(finite, matrix, 0.0), full_matrices=False)
    tol = s.amax() * max(matrix.shape) * torch.finfo(s.dtype).eps
    polar = (u * (s > tol).to(u.dtype)) @ vh
    return polar.mul_(torch.where(finite, 1.0, torch.nan))


KAPPAS: dict[str, Callable[..., Tensor]] = {
    "sign": lambda c, **_: _sign(c),
    "l2": _l2,
    "lp": _lp,
    "huber": lambda c, *, huber_delta, **_: c.div_(huber_delta).clamp_(-1, 1),
    "quadratic": lambda c, **_: c,
    "nuclear": _nuclear,
}


ELEMENTWISE_KAPPAS = ("sign", "huber", "quadratic")  # the others need a norm or an SVD of the whole tensor


@kernel(read_only=("g",))
def lion_k_update(p: Tensor, g: Tensor, m: Tensor, scalars: Any, *, kappa: str, norm_p: float) -> None:
    """One tensor's Lion-𝒦 update, in place; ``scalars`` as made by ``lion_k_``."""
    shrink, beta1, c1, beta2, c2, lr, huber_delta = scalars
    mul_(p, shrink)
    c = add(m * beta1, g, c1)
    add_(p, KAPPAS[kappa](c, norm_p=norm_p, huber_delta=huber_delta).view_as(p), -lr)
    add_(m.mul_(beta2), g, c2)


def lion_k_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    kappa: str = "sign",
    norm_p: float = 2.0,
    huber_delta: float = 1.0,
) -> None:
    """Functional Lion-𝒦 (``kappa="sign"`` is Lion): update ``params`` and ``states`` (``exp_avg``) in place."""
    beta1, beta2 = betas
    scalars = (1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, lr, huber_delta)
    update = lion_k_update if kappa in ELEMENTWISE_KAPPAS else lion_k_update.fn  # the rest runs eagerly
    for p, g, state in zip(params, grads, states):
        if p.numel():
            update(p, g, state["exp_avg"], scalars=scalars, kappa=kappa, norm_p=norm_p if kappa == "lp" else 2.0)


class LionK(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(lion_k_)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        kappa: str = "sign",
        norm_p: float = 2.0,
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg": self._zeros(p)}



class Lion(LionK):
    __doc__ = __doc__

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("kappa", "norm_p", "huber_delta"):
            if key in param_group:
                raise ValueError(f"Invalid {key}: {param_group[key]!r}; expected none (Lion is LionK with "
                                 "kappa='sign': use LionK for another κ)")
        super().add_param_group(param_group)


_COMMON = {"lr": NON_NEGATIVE, "betas": Each((_BETA, _BETA)), "weight_decay": NON_NEGATIVE}
_LION_ADVICE = "Learning rate 3-10x lower and weight decay 3-10x higher than AdamW's (authors' advice)."

register(
    MethodInfo(
        name="lion",
        cls=Lion,
        kind="optimizer",
        paper="Symbolic Discovery of Optimization Algorithms",
        arxiv="2302.06675",
        code_url="https://github.com/google/automl/tree/master/lion",
        summary="sign of an interpolated momentum with decoupled weight decay; one state buffer",
        hyperparameters=_COMMON,
        lr_range=(1e-5, 1e-2),
        advice=_LION_ADVICE,
    )
)
register(
    MethodInfo(
        name="lionk",
        cls=LionK,
        kind="optimizer",
        paper="Lion Secretly Solves Constrained Optimization, As Lyapunov Predicts",
        arxiv="2310.05898",
        summary="Lion with sign replaced by the gradient of a convex 𝒦 (ℓ2, ℓp, Huber, quadratic, nuclear)",
        hyperparameters={
            **_COMMON,
            "kappa": Choice(tuple(KAPPAS)),
            "norm_p": Interval(1.0, low_closed=False),
            "huber_delta": POSITIVE,
        },
        lr_range=(1e-5, 1e-2),
        advice=_LION_ADVICE + " Norm-based κ move each tensor by lr in that norm, so retune lr per κ.",
    )
)
