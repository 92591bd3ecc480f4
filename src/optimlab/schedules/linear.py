r"""Linear decay with an optional linear warm-up, as a function of the step and as an ``LRScheduler``.

Paper: Defazio, Cutkosky, Mehta, Mishchenko, "When, Why and How Much? Adaptive Learning Rate Scheduling by
Refinement" (later "Optimal Linear Decay Learning Rate Schedules and Further Refinements"), arXiv
`2310.07831 <https://arxiv.org/abs/2310.07831>`_. Official code:
https://github.com/facebookresearch/adaptive_scheduling. The paper shows that linear decay to zero is the
worst-case optimal schedule for the last iterate of SGD, and that in practice it matches or beats cosine.

For a run of :math:`T` steps (0-based step :math:`t`) with :math:`W` warm-up steps, the multiplier of the peak
learning rate is

.. math::

    m_t = \begin{cases}
        \dfrac{t+1}{W} & t < W \qquad\text{(warm-up, reaches 1 at } t = W-1\text{)}\\[2ex]
        \dfrac{T-1-t}{T-1-p} & p \le t \le T-1, \quad p = \max(W-1, 0) \\[2ex]
        0 & t \ge T
    \end{cases}

so the peak is at step :math:`p`, the two pieces meet there, and the last step :math:`T-1` has multiplier 0.
Without warm-up this is :math:`m_t = (T-1-t)/(T-1)`, exactly what the refined schedule
(:func:`optimlab.schedules.refine`) gives for a constant gradient-norm sequence: its closed form gives the last
step a zero step size, :math:`\eta_T = 0`. (The textbook form :math:`1 - t/T` ends at :math:`1/T` instead.)
``warmup_steps=1`` equals ``warmup_steps=0``: a one-step warm-up already sits at the peak.

Arguments: ``total_steps`` :math:`T \ge 2`; ``warmup_steps`` :math:`W` with :math:`0 \le W \le T-1` (default 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from optimlab._core.validation import Interval

__all__ = ["LinearDecayLR", "linear_decay"]


def _check_linear_decay(total_steps: int, warmup_steps: int) -> None:
    Interval(2, integer=True).check("total_steps", total_steps)
    Interval(0, total_steps - 1, integer=True).check("warmup_steps", warmup_steps)


def linear_decay(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiplier of the peak learning rate at 0-based ``step`` (see the module docstring): ``(step + 1) /
    warmup_steps`` during the warm-up, then linear decay to 0 at the last step ``total_steps - 1``; 0 after."""
    _check_linear_decay(total_steps, warmup_steps)
    Interval(0, integer=True).check("step", step)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    peak = max(warmup_steps - 1, 0)
    return (total_steps - 1 - step) / (total_steps - 1 - peak)


class _MultiplierLR(LRScheduler):
    """Sets each group's lr to its initial lr times ``self.multiplier(step)``; a subclass defines
    ``multiplier``. The state (``state_dict``) is the base class's: plain numbers and lists only."""

    def multiplier(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[Any]:
        factor = self.multiplier(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[Any]:
        return self.get_lr()


class LinearDecayLR(_MultiplierLR):
    """:func:`linear_decay` as an ``LRScheduler``: after ``k`` calls of :meth:`step` each param group's lr is
    its initial lr (the peak) times ``linear_decay(k, total_steps, warmup_steps)``. Call :meth:`step` once per
    optimizer step, after it, as with any torch scheduler::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = LinearDecayLR(opt, total_steps=10_000, warmup_steps=500)
        for batch in loader:
            ...; opt.step(); sched.step()
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, last_epoch: int = -1
    ) -> None:
        _check_linear_decay(total_steps, warmup_steps)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return linear_decay(step, self.total_steps, self.warmup_steps)
