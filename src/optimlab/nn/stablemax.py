r"""StableMax and the log-StableMax cross-entropy: a softmax whose numerator grows linearly, not exponentially.

Paper: Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025, arXiv
`2501.04697 <https://arxiv.org/abs/2501.04697>`_ (§3.3, Definition 4 and Proposition 1). Official code:
https://github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability (``utils.py``).

With :math:`s(x) = x + 1` for :math:`x \ge 0` and :math:`s(x) = 1/(1 - x)` for :math:`x < 0`,

.. math::

    \operatorname{StableMax}(x)_i = \frac{s(x_i)}{\sum_j s(x_j)}, \qquad
    \mathcal L(x, y) = -\log \operatorname{StableMax}(x)_y .

Once a model fits its training set, softmax cross-entropy keeps rewarding larger logits, and in floating point
the largest probability rounds to exactly 1: the loss and its gradient become exactly zero ("softmax
collapse") and learning stops. :math:`s` grows only linearly, so the probabilities stay below 1 for far larger
logits.

Computation. :math:`\log s(x) = \operatorname{sign}(x)\log(1 + \lvert x\rvert)`, and Proposition 1 of the paper
gives :math:`\operatorname{StableMax}(x) = \operatorname{Softmax}(\log s(x))`; so log-StableMax is
``log_softmax`` of :func:`log_s`. That is one fused, max-shifted reduction: no division by a sum that can
overflow, and no inf in the branch :func:`torch.where` would not select (which would poison the gradient at
:math:`x = 1`). The official code evaluates the ratio directly in float64; here the input's dtype is kept
(float16/bfloat16 are computed in float32), or ``dtype`` asks for another, e.g. ``torch.float64`` as the
official code does.

Hyperparameters (defaults) of :class:`StableMaxCrossEntropyLoss`: ``reduction`` "mean" (the paper's; "sum" and
"none" as in torch), ``dtype`` None (the logits' own, float32 for float16/bfloat16).

Coming from ``nn.CrossEntropyLoss``: a drop-in replacement on the same logits and integer labels. It is the
paper's remedy for softmax collapse; against the other cause it identifies, naive loss minimisation (the
gradient turning into a scaling of the weights), the paper adds ⊥Grad
(:class:`~optimlab.transforms.orthograd.OrthoGrad`), and trains without weight decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from optimlab.registry import MethodInfo, register

__all__ = ["StableMaxCrossEntropyLoss", "log_s", "log_stablemax", "stablemax", "stablemax_cross_entropy", "stablemax_s"]


def stablemax_s(x: Tensor) -> Tensor:
    """The paper's :math:`s`: ``x + 1`` where ``x >= 0``, ``1 / (1 - x)`` where ``x < 0`` (positive, C¹)."""
    return torch.where(x >= 0, x.clamp(min=0) + 1, 1 / (1 - x.clamp(max=0)))


def _working(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"StableMax needs floating-point logits, got {x.dtype}")
    if dtype is not None:
        return x.to(dtype)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log_s(x: Tensor) -> Tensor:
    """:math:`\\log s(x) = \\operatorname{sign}(x)\\log(1 + \\lvert x\\rvert)`, written with clamps so that its
    gradient at 0 is :math:`s'(0)/s(0) = 1` (``sign(x) * log1p(|x|)`` would give autograd's 0 there)."""
    return torch.where(x >= 0, torch.log1p(x.clamp(min=0)), -torch.log1p(-x.clamp(max=0)))


def log_stablemax(x: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor:
    """:math:`\\log \\operatorname{StableMax}(x)` along ``dim``."""
    return torch.log_softmax(log_s(_working(x, dtype)), dim=dim)


def stablemax(x: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor:
    """:math:`\\operatorname{StableMax}(x)` along ``dim`` (non-negative, sums to 1)."""
    return log_stablemax(x, dim, dtype=dtype).exp()


def stablemax_cross_entropy(
    logits: Tensor, target: Tensor, *, reduction: str = "mean", dtype: torch.dtype | None = None
) -> Tensor:
    """Cross-entropy of log-StableMax, shaped as :func:`torch.nn.functional.cross_entropy` with class indices:
    ``logits`` (C,), (N, C) or (N, C, d1, ...), the classes along dim 1 (0 for a single example), integer
    ``target`` (), (N,) or (N, d1, ...); ``reduction`` "mean" (default, as the paper), "sum" or "none"."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Invalid reduction: {reduction!r}; expected 'mean', 'sum' or 'none'")
    if target.is_floating_point():
        raise TypeError("stablemax_cross_entropy takes integer class indices as target, not probabilities")
    class_dim = 0 if logits.dim() == 1 else 1
    return F.nll_loss(log_stablemax(logits, dim=class_dim, dtype=dtype), target, reduction=reduction)


class StableMaxCrossEntropyLoss(torch.nn.Module):
    __doc__ = __doc__

    def __init__(self, reduction: str = "mean", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"Invalid reduction: {reduction!r}; expected 'mean', 'sum' or 'none'")
        self.reduction, self.dtype = reduction, dtype

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return stablemax_cross_entropy(logits, target, reduction=self.reduction, dtype=self.dtype)


register(
    MethodInfo(
        name="stablemax",
        cls=StableMaxCrossEntropyLoss,
        kind="loss",
        paper="Grokking at the Edge of Numerical Stability",
        arxiv="2501.04697",
        code_url="https://github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability",
        summary="cross-entropy of StableMax, a softmax with a linearly growing numerator that does not collapse "
        "in floating point",
        advice="Replace nn.CrossEntropyLoss; the paper pairs it with ⊥Grad (orthograd) and no weight decay.",
    )
)
