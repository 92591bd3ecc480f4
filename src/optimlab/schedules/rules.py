r"""Rules for choosing a learning rate: batch-size scaling and the Step Law.

**Batch-size scaling.** Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix
Theory Approach to Neural Network Training" (JMLR 2022), arXiv `2006.09092 <https://arxiv.org/abs/2006.09092>`_.
From the spectrum of the batch Hessian, the largest stable learning rate grows linearly with the batch size
:math:`B` for SGD and as its square root for adaptive (Adam-type) methods:

.. math::

    \eta(B) = \eta(B_0)\,\frac{B}{B_0} \quad\text{(``"linear"``, SGD)}, \qquad
    \eta(B) = \eta(B_0)\,\sqrt{\frac{B}{B_0}} \quad\text{(``"sqrt"``, adaptive)}.

Both hold below the batch size at which the batch Hessian approaches the full Hessian; beyond it a larger batch
stops buying a larger learning rate.

**Step Law.** Li et al., "Predictable Scale: Part I — Optimal Hyperparameter Scaling Law in Large Language
Model Pretraining", arXiv `2503.04715 <https://arxiv.org/abs/2503.04715>`_; code and data:
https://github.com/step-law/steplaw. From ~3,700 dense and MoE LLM pretraining runs (AdamW-style, final
learning rate 1e-5), the optimal peak learning rate and batch size are

.. math::

    \eta^*(N, D) = 1.79\,N^{-0.713} D^{0.307}, \qquad B^*(D) = 0.58\,D^{0.571},

with :math:`N` the non-embedding parameters, :math:`D` the training tokens and :math:`B^*` in tokens (divide
by the sequence length for sequences). ``coefficients="paper"`` (default) uses these rounded constants;
``coefficients="tool"`` uses the unrounded means of the 1,000 bootstrap fits the authors' prediction tool uses
(``data/1004_fitted_lr_bs_scaling_model_parameters.csv``, commit 32a8f4c):
:math:`\eta^* = e^{0.586308} N^{-0.712922} D^{0.307491}` (:math:`e^{0.586308} \approx 1.7973`, which the paper
prints as 1.79: truncated, not rounded) and :math:`B^* = e^{-0.543542} D^{0.570944}` (:math:`\approx 0.5807`). The two
differ by about 2 % in :math:`\eta^*`. The dense runs cover :math:`N \in [2.15\cdot10^8, 1.07\cdot10^9]` and
:math:`D \in [4\cdot10^9, 10^{11}]`; outside that the law is an extrapolation, and :func:`step_law` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from optimlab._core.validation import POSITIVE, Choice, Interval

__all__ = [
    "STEP_LAW_COEFFICIENTS",
    "STEP_LAW_FIT_RANGE",
    "StepLawResult",
    "batch_scaling_rule",
    "is_sgd_like",
    "scale_lr_for_batch",
    "step_law",
]



def scale_lr_for_batch(lr: float, batch_size: float, base_batch_size: float, rule: str) -> float:
    """The learning rate for ``batch_size`` given a good ``lr`` at ``base_batch_size``: ``lr * B / B0`` for
    ``rule="linear"`` (SGD), ``lr * sqrt(B / B0)`` for ``rule="sqrt"`` (adaptive methods); see
    :func:`batch_scaling_rule` to pick the rule for an optimizer."""
    Interval(0.0).check("lr", lr)
    POSITIVE.check("batch_size", batch_size)
    POSITIVE.check("base_batch_size", base_batch_size)
    Choice(("linear", "sqrt")).check("rule", rule)
    ratio = batch_size / base_batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


# SGD-like: the step is the (momentum-averaged) gradient times lr. Adaptive: the step is divided by a running
# gradient scale, so its size does not grow with the gradient's.
_SGD_LIKE: tuple[type, ...] = (torch.optim.SGD, torch.optim.ASGD)
_ADAPTIVE_TORCH = (
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "SparseAdam",
    "Adafactor",
)


def _optimizer_type(optimizer: Any) -> type:
    """The optimizer class behind an instance, a class or a bench spec string (wrappers, fixed hyperparameters
    and ``@schedule`` suffixes are looked through: ``"orthograd(torch:SGD[momentum=0.9])@linear"`` is SGD)."""
    from optimlab._core.wrapper import OptimizerWrapper
    from optimlab.registry import optimizer_class

    if isinstance(optimizer, OptimizerWrapper):
        return _optimizer_type(optimizer.optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer)
    if isinstance(optimizer, str):
        from optimlab.bench.specs import parse_spec

        return optimizer_class(parse_spec(optimizer).innermost.name)
    if isinstance(optimizer, type):
        return optimizer
    raise TypeError(f"expected an optimizer, an optimizer class or a spec string, got {type(optimizer).__name__}")


def _rule_of(cls: type) -> str | None:
    """"linear", "sqrt" or None for an optimizer class: optimlab's from their registry entries
    (``MethodInfo.batch_scaling``), torch's from the lists above."""
    info = getattr(cls, "info", None)
    if info is not None and getattr(info, "cls", None) is cls:
        return info.batch_scaling
    if issubclass(cls, _SGD_LIKE):
        return "linear"
    if issubclass(cls, tuple(getattr(torch.optim, n) for n in _ADAPTIVE_TORCH if hasattr(torch.optim, n))):
        return "sqrt"
    return None


def is_sgd_like(optimizer: Any) -> bool:
    """True for SGD (with or without momentum), ASGD and optimlab's SGD-like methods, given as an instance, a
    class or a spec string (``"sgd"``, ``"torch:SGD@linear"``, ``"orthograd(sgd)"``, ``"coordclip_sgd"``)."""
    return _rule_of(_optimizer_type(optimizer)) == "linear"


def batch_scaling_rule(optimizer: Any) -> Literal["linear", "sqrt"]:
    """The batch-size scaling rule for an optimizer (instance, class or spec string): ``"linear"`` for SGD-like
    methods, ``"sqrt"`` for adaptive (Adam-type) ones. Optimizers the theory does not cover (sign methods such
    as Lion, second-order methods) raise ``ValueError``: pass ``rule=`` to :func:`scale_lr_for_batch` yourself."""
    cls = _optimizer_type(optimizer)
    rule = _rule_of(cls)
    if rule is not None:
        return rule  # type: ignore[return-value]
    raise ValueError(
        f"no batch-size scaling rule is known for {cls.__name__}: the rules cover SGD ('linear') and Adam-type "
        "adaptive methods ('sqrt'); choose one and pass it as rule= to scale_lr_for_batch"
    )


# (log lr intercept, lr exponent of N, lr exponent of D, log batch intercept, batch exponent of D)
STEP_LAW_COEFFICIENTS: dict[str, tuple[float, float, float, float, float]] = {
    "paper": (math.log(1.79), -0.713, 0.307, math.log(0.58), 0.571),
    # means over the 1,000 bootstrap fits of the released tool (step-law/steplaw, data/1004_..._parameters.csv)
    "tool": (0.5863077907399264, -0.7129222911869909, 0.30749095041206964, -0.543542173610334, 0.5709443646895052),
}
# the dense runs of the released data: min/max of the non-embedding parameters N and of the tokens D
STEP_LAW_FIT_RANGE: dict[str, tuple[float, float]] = {"params": (214_663_680.0, 1_073_741_824.0), "tokens": (4e9, 1e11)}


@dataclass(frozen=True)
class StepLawResult:
    """The Step Law's prediction: peak ``lr``, batch size in tokens and (when a sequence length was given) in
    sequences, whether (N, D) lies in the fitted range, and a warning per coordinate that does not."""

    lr: float
    batch_tokens: float
    batch_sequences: float | None
    in_fitted_range: bool
    warnings: list[str] = field(default_factory=list)


def step_law(params: float, tokens: float, *, seq_len: int | None = None, coefficients: str = "paper") -> StepLawResult:
    """The Step Law's optimal peak learning rate and batch size for ``params`` non-embedding parameters trained
    on ``tokens`` tokens (see the module docstring). ``coefficients``: ``"paper"`` (rounded, default) or
    ``"tool"`` (the released fit's unrounded means). Out-of-range inputs are not an error: the result says so in
    ``in_fitted_range`` and ``warnings`` (nothing is emitted through :mod:`warnings`)."""
    POSITIVE.check("params", params)
    POSITIVE.check("tokens", tokens)
    if seq_len is not None:
        Interval(1, integer=True).check("seq_len", seq_len)
    Choice(tuple(STEP_LAW_COEFFICIENTS)).check("coefficients", coefficients)
    if not (math.isfinite(params) and math.isfinite(tokens)):
        raise ValueError(f"Invalid params/tokens: expected finite numbers, got {params!r} and {tokens!r}")
    lr_log, lr_n, lr_d, batch_log, batch_d = STEP_LAW_COEFFICIENTS[coefficients]
    lr = math.exp(lr_log + lr_n * math.log(params) + lr_d * math.log(tokens))
    batch_tokens = math.exp(batch_log + batch_d * math.log(tokens))
    warnings = []
    for name, value in (("params", params), ("tokens", tokens)):
        low, high = STEP_LAW_FIT_RANGE[name]
        if not low <= value <= high:
            warnings.append(
                f"{name} = {value:.3g} is outside the Step Law's fitted range [{low:.3g}, {high:.3g}] "
                "(dense runs): the prediction is an extrapolation"
            )
    return StepLawResult(
        lr=lr,
        batch_tokens=batch_tokens,
        batch_sequences=None if seq_len is None else batch_tokens / seq_len,
        in_fitted_range=not warnings,
        warnings=warnings,
    )
