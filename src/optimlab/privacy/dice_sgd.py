r"""DiceSGD: differentially private SGD with clipped error feedback, which removes the clipping bias.

Paper: Zhang, Bu, Wu, Hong, "Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach",
ICLR 2024, arXiv `2311.14632 <https://arxiv.org/abs/2311.14632>`_. Official code:
https://github.com/564612540/DiceSGD (``DiceSGD/optimizers_utils.py``, ``trainers.py``, ``train_cifar.py``; built
on fastDP).

DP-SGD with per-sample clipping (:class:`~optimlab.privacy.dp_sgd.DPSGD`) follows the average of *clipped*
gradients, a biased direction, for any threshold below the gradients' norms. DiceSGD keeps a hidden error
buffer :math:`e` of what clipping removed and feeds a clipped part of it back each step. With :math:`e_0 = 0`,
the per-sample gradients :math:`g_i` of the batch, :math:`\bar g = \frac1{\bar B}\sum_i g_i` and
:math:`\operatorname{clip}(x, C) = x\min(1, C/\lVert x\rVert)` (norms over all parameters):

.. math::

    v_t &= \frac{1}{\bar B}\sum_{i \in B_t} \operatorname{clip}(g_i, C_1) + \operatorname{clip}(e_t, C_2) \\
    \theta_{t+1} &= \theta_t - \alpha\,(v_t + w_t), \qquad
        w_t \sim \mathcal N\Big(0, \big(\sigma C_1 \sqrt{1 + 2C_2/C_1}\,/\,\bar B\big)^2 I\Big) \\
    e_{t+1} &= e_t + \bar g - v_t
             = \big[e_t - \operatorname{clip}(e_t, C_2)\big] + \frac{1}{\bar B}\sum_{i \in B_t}
               \big(g_i - \operatorname{clip}(g_i, C_1)\big)

(the paper's form; the noise never enters :math:`e`). :math:`e` is private information: it is optimizer state
(so it is in ``state_dict``), but never log or release it. With :math:`C_2 = 0` no error is fed back and the
step is DP-SGD-GC's with the same noise; with :math:`\sigma = 0` and :math:`C_1 = C_2 = \infty` it is plain SGD.
Paper's advice: :math:`C_2 \ge C_1`.

**Parameters as in the official code.** :math:`C_2` is given as the ratio ``error_clip_ratio``
:math:`r = C_2/C_1`; ``noise_multiplier`` :math:`\sigma` is the *DP-SGD* noise multiplier for the target
:math:`(\varepsilon, \delta)`, and the optimizer inflates the noise standard deviation on the sum to
:math:`\sigma C_1\sqrt{1 + 2r}` as the official code does
(:func:`~optimlab.privacy.accounting.dicesgd_noise_inflation`). The :math:`\varepsilon` of
:func:`~optimlab.privacy.dp_sgd.train_private` for DiceSGD is therefore DP-SGD's at :math:`\sigma`: the official
practice, not a bound proved for DiceSGD (the paper's Theorem 3.8 states the noise as a standard deviation
depending on :math:`C_1`, :math:`C_2` and a gradient bound; the official README lists the DiceSGD noise
calculation as a to-do).

**Where the official code differs** (``PrivacyEngine_Dice._create_noisy_clipped_dice_gradient``); optimlab
implements the paper's form above:

* it keeps :math:`e` on the scale of the *sum* over the batch, :math:`e \leftarrow \ldots + \sum_i
  (g_i - \operatorname{clip}(g_i, C_1))`, clips that at :math:`C_2` and divides everything by the batch size
  afterwards, so on the scale of :math:`v_t` its feedback is clipped at :math:`C_2/B` instead of :math:`C_2`;
* its buffer update is :math:`e \leftarrow e\cdot\min(a, 1 - \min(a, 1)) + \ldots` with
  :math:`a = C_2/(\lVert e\rVert + 10^{-6})`: equal to the paper's :math:`e(1 - \min(a, 1))` when
  :math:`a \ge 1/2`, but :math:`a\,e` instead of :math:`(1 - a)\,e` when :math:`a < 1/2`;
* its first step only fills :math:`e` (no feedback), which is the paper's step with :math:`e_0 = 0`;
* its norms add :math:`10^{-6}` (here the exact :math:`\min(1, C/\lVert x\rVert)`);
* its ``train_cifar.py`` divides the learning rate by :math:`C_1` (``lr_true = lr / C``).

The normaliser :math:`\bar B` is ``expected_batch_size`` (:math:`qN` under Poisson sampling, Opacus's choice) or,
with ``None``, the actual batch size (the official code divides by its fixed logical batch size), as in
:mod:`optimlab.privacy.dp_sgd`, which also describes how to pass per-sample gradients (``step(per_sample_grads)``,
``p.grad_sample`` or ``step_batch``; never ``p.grad``). A parameter without per-sample gradients in a step is
left out of that step entirely, its error buffer included.

Hyperparameters (defaults), from the official ``train_cifar.py``: ``lr`` 0.2 (the script's ``--lr 0.1`` divided by
:math:`C_1`), ``max_grad_norm`` :math:`C_1` 0.5 (> 0), ``error_clip_ratio`` :math:`r` 1.0 (≥ 0; the ablation
grid is {0.3, 1, 3, 10, 30}), ``noise_multiplier`` :math:`\sigma` 1.0 (≥ 0; the official runs calibrate it to
:math:`\varepsilon = 2`: use :func:`~optimlab.privacy.accounting.noise_multiplier_for`), ``expected_batch_size``
None, ``seed`` 0. All but ``lr`` act on all param groups at once.

Coming from AdamW: as for DP-SGD (SGD learning rates, a large expected batch, σ from the privacy budget), with a
small ``max_grad_norm`` C1 (the error feedback removes the bias a small threshold causes) and ``error_clip_ratio``
r ≥ 1 (C2 ≥ C1, the paper's advice; the noise grows as sqrt(1 + 2r)).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab._core.optimizer import state_dtype
from optimlab._core.validation import NON_NEGATIVE
from optimlab.privacy.accounting import dicesgd_noise_inflation
from optimlab.privacy.dp_sgd import (
    PRIVATE_EXEMPTIONS,
    PRIVATE_HYPERPARAMETERS,
    PrivateOptimizer,
    add_gaussian_,
    clip_factors,
    scale_to,
)
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = ["DiceSGD", "dice_sgd_"]


def dice_sgd_(
    params: list[Tensor],
    per_sample_grads: list[Tensor],
    errors: list[Tensor],
    *,
    lrs: Sequence[float],
    max_grad_norm: float,
    error_clip_ratio: float,
    noise_multiplier: float,
    batch_size: float,
    generator: torch.Generator,
) -> None:
    """Functional DiceSGD (the paper's form): one step on ``params`` (``lrs``, one learning rate per parameter)
    and their error buffers ``errors``, in place; norms over all of ``params``, sums divided by ``batch_size``."""
    factors = clip_factors(per_sample_grads, max_grad_norm)
    error_threshold = error_clip_ratio * max_grad_norm if error_clip_ratio else 0.0  # 0 * inf is 0 here
    error_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in errors]))
    feedback = scale_to(error_norm, error_threshold)  # clip(e, C2) = feedback * e
    std = noise_multiplier * max_grad_norm * dicesgd_noise_inflation(error_clip_ratio) if noise_multiplier else 0.0
    for p, g, e, lr in zip(params, per_sample_grads, errors, lrs):
        g = g.to(state_dtype(p))
        f = factors.to(g.dtype)
        clipped = torch.tensordot(f, g, dims=1)
        # sum of g_i - clip(g_i) as one product, exactly zero where nothing was clipped
        residual = torch.tensordot(1 - f, g, dims=1)
        # v + w = (clipped sum + noise) / B + clip(e)
        step = add_gaussian_(clipped, std, generator).div_(batch_size).addcmul_(e, feedback)
        e.mul_(1 - feedback).add_(residual, alpha=1 / batch_size)
        p.add_(step, alpha=-lr)


class DiceSGD(PrivateOptimizer):
    __doc__ = __doc__
    shared_hyperparameters = (*PrivateOptimizer.shared_hyperparameters, "error_clip_ratio")
    # the ε reported for this optimizer (train_private) and why it is not a proved bound
    epsilon_note = (
        "DiceSGD's epsilon follows the official practice (DP-SGD's RDP accountant at the uninflated noise "
        "multiplier, with the noise std inflated by sqrt(1 + 2 C2/C1)), not a bound proved for DiceSGD"
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.2,
        max_grad_norm: float = 0.5,
        error_clip_ratio: float = 1.0,
        noise_multiplier: float = 1.0,
        expected_batch_size: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _check_group(self, merged: dict[str, Any]) -> None:
        super()._check_group(merged)
        if merged["noise_multiplier"] > 0 and merged["error_clip_ratio"] == float("inf"):
            raise ValueError(
                "Invalid error_clip_ratio: inf; expected a finite number when noise_multiplier > 0 (the noise std "
                "grows as sqrt(1 + 2 error_clip_ratio)); use inf only with noise_multiplier=0"
            )

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"error": self._zeros(p)}

    def _private_update(self, params, per_sample_grads, states, **hyperparameters) -> None:
        dice_sgd_(params, per_sample_grads, [s["error"] for s in states], **hyperparameters)


register(
    MethodInfo(
        name="dicesgd",
        cls=DiceSGD,
        kind="optimizer",
        paper="Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach",
        arxiv="2311.14632",
        code_url="https://github.com/564612540/DiceSGD",
        summary="DP-SGD with a hidden error buffer of what per-sample clipping removed, fed back clipped: no "
        "clipping bias; takes per-sample gradients, not p.grad",
        hyperparameters={**PRIVATE_HYPERPARAMETERS, "error_clip_ratio": NON_NEGATIVE},
        lr_range=(1e-3, 1.0),
        capabilities=Capabilities(per_sample_grads=True, global_state=True, stochastic=True, compilable=False),
        exemptions=PRIVATE_EXEMPTIONS,
        batch_scaling="linear",
        advice="noise_multiplier is DP-SGD's for the target (epsilon, delta) (noise_multiplier_for); the optimizer "
        "inflates the noise by sqrt(1 + 2 error_clip_ratio) as the official code does, so the epsilon follows that "
        "practice, not a proved bound. Paper: C2 >= C1 (error_clip_ratio >= 1).",
    )
)
