r"""Normalized LR+GD: logistic regression by gradient descent with a step normalised by the soft error rate.

Paper: Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient Descent with Large
Step Sizes", arXiv `2412.08424 <https://arxiv.org/abs/2412.08424>`_, §6 (Normalized LR+GD, Theorem 6.1).
No official code is published.

The problem is *separation*: find :math:`\theta` with every margin :math:`y_i a_i^\top\theta > 0` for data
:math:`(a_i, y_i)`, :math:`y_i \in \{-1, +1\}`, that a hyperplane through the origin separates. LR+GD runs gradient
descent on the logistic loss

.. math::

    f(\theta) = \frac1n \sum_{i=1}^n \log\bigl(1 + e^{-y_i a_i^\top\theta}\bigr), \qquad
    \nabla f(\theta) = -\frac1n \sum_{i=1}^n w_i(\theta)\, y_i a_i, \qquad
    w_i(\theta) = \sigma(-y_i a_i^\top\theta),

and Normalized LR+GD divides the step by the mean weight :math:`\bar w = \frac1n\sum_i w_i`:

.. math::

    \theta_{t+1} = \theta_t - \frac{\gamma}{\bar w(\theta_t)}\,\nabla f(\theta_t)
                 = \theta_t + \gamma\,\frac{\sum_i w_i\, y_i a_i}{\sum_i w_i}
    \qquad\text{(plain LR+GD: } \theta_{t+1} = \theta_t - \gamma\nabla f(\theta_t)\text{)}.

As :math:`\gamma\to\infty` the weights tend to the indicators of the misclassified set
:math:`S_t = \{i : y_i a_i^\top\theta_t \le 0\}`, so the step tends to the *normalised batch perceptron* step
:math:`\frac{1}{|S_t|}\sum_{i\in S_t} y_i a_i`. Theorem 6.1: from :math:`\theta_0 = 0` the data are separated
within :math:`R^2/\mu^2 + 2\log(2n-1)/(\gamma\mu^2)` iterations, :math:`R = \max_i\lVert a_i\rVert`,
:math:`\mu` the max-margin of the data; so larger :math:`\gamma` is better (the paper's experiments use
:math:`\gamma \in \{0.1, 1, 10, 100\}`). Plain LR+GD in the same large-step limit is the *unnormalised* batch
perceptron, with an :math:`n` times worse bound; it is here as the baseline (``normalized=False``).

**Numerics.** Once all margins are large every :math:`w_i \approx e^{-y_i a_i^\top\theta}` underflows and
:math:`\sum_i w_i\, y_i a_i / \sum_i w_i` is 0/0. The weighted mean is therefore computed in log space:
:math:`\log w_i = -\operatorname{softplus}(y_i a_i^\top\theta)` and the normalised weights are
:math:`\operatorname{softmax}(\log w)`, which never divides two underflowing sums.

**Stopping.** :meth:`NormalizedLRGD.run` stops once at most ``tol`` samples (default 0) have margin
:math:`\le 0`: the state's ``error`` is that count. The method is meant for the separation problem, not to drive
the loss to zero: on separable data :math:`f` has no finite minimiser.

Hyperparameters (defaults): ``step_size`` :math:`\gamma` 1.0, ``normalized`` True, ``max_iter`` 1000, ``tol`` 0.

Usage: ``features`` is an ``(n, d)`` floating tensor of the points :math:`a_i` (append a column of ones for an
affine separator), ``labels`` holds :math:`y_i \in \{-1, +1\}` (any real dtype; converted to the features'
dtype). Iterates are ``(d,)`` tensors in the features' dtype and device; start from zeros, as the paper's
bounds assume::

    solver = NormalizedLRGD(features, labels, step_size=10.0)
    theta, state = solver.run(torch.zeros(features.shape[1], dtype=features.dtype))
    state.iter_num, state.error  # iterations used; samples still misclassified (0: separated)

Coming from AdamW: this is not a training optimizer but a solver of one problem (see :mod:`optimlab.solvers`);
its step size is large on purpose: the paper's point is that :math:`\gamma \gg 1` separates fastest.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Flag, Interval
from optimlab.registry import MethodInfo, register
from optimlab.solvers.base import Solver

__all__ = ["LRGDState", "NormalizedLRGD", "logistic_gradient", "logistic_loss", "lrgd_direction", "margins"]


class LRGDState(NamedTuple):
    """State of :class:`NormalizedLRGD` at an iterate :math:`\\theta`."""

    iter_num: int
    error: Tensor  # the number of samples with margin <= 0 (int64, 0-dim)
    margins: Tensor  # y_i a_i^T theta, shape (n,)


def margins(features: Tensor, labels: Tensor, theta: Tensor) -> Tensor:
    """The margins :math:`y_i a_i^\\top\\theta`, shape ``(n,)``."""
    return labels * (features @ theta)


def logistic_loss(features: Tensor, labels: Tensor, theta: Tensor) -> Tensor:
    """:math:`f(\\theta) = \\frac1n\\sum_i \\log(1 + e^{-y_i a_i^\\top\\theta})`, computed as a mean of softplus."""
    return F.softplus(-margins(features, labels, theta)).mean()


def logistic_gradient(features: Tensor, labels: Tensor, theta: Tensor) -> Tensor:
    """:math:`\\nabla f(\\theta) = -\\frac1n\\sum_i \\sigma(-y_i a_i^\\top\\theta)\\, y_i a_i`."""
    weights = torch.sigmoid(-margins(features, labels, theta))
    return -((weights * labels) @ features) / features.shape[0]


def lrgd_direction(features: Tensor, labels: Tensor, margins: Tensor, *, normalized: bool) -> Tensor:
    """The step direction at the given margins: :math:`\\theta_{t+1} = \\theta_t + \\gamma\\,d`.

    ``normalized=True``: :math:`d = \\sum_i \\operatorname{softmax}(-\\operatorname{softplus}(m))_i\\, y_i a_i`,
    the :math:`w`-weighted mean of the :math:`y_i a_i` (log space: finite however large the margins);
    ``normalized=False``: :math:`d = -\\nabla f = \\frac1n\\sum_i \\sigma(-m_i)\\, y_i a_i`.
    """
    if normalized:
        weights = torch.softmax(-F.softplus(margins), dim=0)
    else:
        weights = torch.sigmoid(-margins) / margins.shape[0]
    return (weights * labels) @ features


class NormalizedLRGD(Solver[LRGDState]):
    __doc__ = __doc__

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        *,
        step_size: float = 1.0,
        normalized: bool = True,
        max_iter: int = 1000,
        tol: float = 0,
    ) -> None:
        self.check_hyperparameters(step_size=step_size, normalized=normalized, max_iter=max_iter, tol=tol)
        if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise ValueError(
                "features must be a 2-D floating tensor of shape (n, d), one point per row; got "
                + (
                    f"shape {tuple(features.shape)}, dtype {features.dtype}"
                    if isinstance(features, Tensor)
                    else repr(type(features))
                )
            )
        if features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(
                f"features must have at least one point and one coordinate; got shape {tuple(features.shape)}"
            )
        if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else repr(type(labels))
            raise ValueError(
                f"labels must be a 1-D tensor of length n = {features.shape[0]} (one per row of features); got {got}"
            )
        labels = labels.to(dtype=features.dtype, device=features.device)
        if not ((labels == 1) | (labels == -1)).all():
            raise ValueError("labels must be -1 or +1 (convert {0, 1} labels with 2 * y - 1)")
        self.features, self.labels = features, labels
        self.step_size, self.normalized, self.max_iter, self.tol = step_size, normalized, max_iter, tol

    def _as_iterate(self, x: Tensor) -> Tensor:
        d = self.features.shape[1]
        if not isinstance(x, Tensor) or x.shape != (d,):
            got = tuple(x.shape) if isinstance(x, Tensor) else repr(type(x))
            raise ValueError(f"the iterate must be a tensor of shape (d,) = ({d},); got {got}")
        return x.to(dtype=self.features.dtype, device=self.features.device)

    def _state(self, iter_num: int, theta: Tensor) -> LRGDState:
        m = margins(self.features, self.labels, theta)
        return LRGDState(iter_num, (m <= 0).sum(), m)

    def init_state(self, x0: Tensor) -> LRGDState:
        return self._state(0, self._as_iterate(x0))

    def update(self, x: Tensor, state: LRGDState) -> tuple[Tensor, LRGDState]:
        theta = self._as_iterate(x)
        direction = lrgd_direction(self.features, self.labels, state.margins, normalized=self.normalized)
        theta = theta + self.step_size * direction
        return theta, self._state(state.iter_num + 1, theta)

    def optimality_fun(self, x: Tensor, features: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """:math:`\\nabla f(x)` on ``(features, labels)`` (the solver's own by default), for both modes: the
        normalisation only rescales the step, so the stationary points are the same.

        On separable data this residual is never zero (:math:`f` has no finite minimiser; it tends to zero
        only along directions that separate the data as :math:`\\lVert x\\rVert\\to\\infty`), so implicit
        differentiation does not apply there; it does on non-separable data, where the minimiser is unique.
        """
        features = self.features if features is None else features
        labels = self.labels if labels is None else labels
        return logistic_gradient(features, labels, x)

    def extra_repr(self) -> str:
        n, d = self.features.shape
        return f"n={n}, d={d}, step_size={self.step_size}, normalized={self.normalized}, max_iter={self.max_iter}, tol={self.tol}"


register(
    MethodInfo(
        name="normalized_lrgd",
        cls=NormalizedLRGD,
        kind="solver",
        paper="From Logistic Regression to the Perceptron Algorithm: Exploring Gradient Descent with Large Step Sizes",
        arxiv="2412.08424",
        summary="logistic-regression GD with its step divided by the mean soft error; separates data like a "
        "normalised batch perceptron",
        hyperparameters={
            "step_size": POSITIVE,
            "normalized": Flag(),
            "max_iter": Interval(0, integer=True),
            "tol": NON_NEGATIVE,
        },
        advice="For separation, not for minimising the loss: larger step sizes separate in fewer iterations "
        "(Theorem 6.1); start from zeros.",
    )
)
